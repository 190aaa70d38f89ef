"""Train / eval splits that share no prompt: the messages of a raw row, the key that makes two rows duplicates,
dedupe, the seeded split, decontamination of the corpus against eval prompts, the judge's disjoint part of the
preference pairs, and the n-gram overlap that is left.

Rows are the readers' (posttrain.data.readers) per kind: corpus {"text"}, instruction {"messages"}, refusal
{"prompt", "response"}, cot {"question", "rationale", "answer"}, preference {"prompt", "chosen", "rejected"},
prompt {"prompt", "answer"}; a row's `_split` (auto / train / eval) comes from its source.
"""

from __future__ import annotations

import hashlib

from posttrain.data.overlap import contains_any, normalise_text, overlap, probes, tokens


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def prompt_of(kind: str, row: dict) -> list[dict]:
    """The messages a model sees before it answers."""
    if kind == "instruction":
        return row["messages"][:-1]
    if kind == "preference":
        return row["prompt"]
    return user(row["question"] if kind == "cot" else row["prompt"])


def text_of(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def key_of(kind: str, row: dict) -> str:
    """What makes two examples duplicates: the normalised text of a corpus document, else of the prompt."""
    return normalise_text(row["text"] if kind == "corpus" else text_of(prompt_of(kind, row)))


def dedupe(kind: str, rows: list[dict]) -> list[dict]:
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = key_of(kind, row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def split(kind: str, rows: list[dict], fraction: float, cap: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) by each row's `_split` (from its source; none: auto).

    auto rows: eval is the `fraction` of them whose normalised prompt ranks lowest under a seeded hash;
    eval rows: all in eval; train rows: all in train. Eval stops at `cap`: auto rows past it go to train,
    eval-only rows past it are left out. Every kind ranks by the same hash, so a prompt found in two kinds
    (a word problem that is both a cot example and a preference pair) tends to fall on the same side in
    both, and dropping held-out prompts from train then drops few rows. The order is pseudo-random, so any
    prefix of eval is a fair sample of it.
    """
    order = sorted(rows, key=lambda r: rank(seed, key_of(kind, r)))
    n_auto_eval = round(sum(r.get("_split", "auto") == "auto" for r in rows) * fraction)
    train, held, auto_seen = [], [], 0
    for r in order:
        source = r.get("_split", "auto")
        wants_eval = source == "eval" or (source == "auto" and auto_seen < n_auto_eval)
        auto_seen += source == "auto"
        if wants_eval and len(held) < cap:
            held.append(r)
        elif source != "eval":  # an eval-only row past the cap is left out: never trained on
            train.append(r)
    return train, held


def decontaminate(docs: list[dict], eval_prompts: list[str], n: int, min_tokens: int) -> list[dict]:
    """The corpus documents that contain no eval prompt (normalised): no n-gram of it, nor the whole of a
    shorter one (of at least min_tokens tokens)."""
    marks = probes([tokens(p) for p in eval_prompts], n, min_tokens)
    return [d for d in docs if not contains_any(tokens(d["text"]), marks)]


def overlap_report(files: dict[str, list], sizes: list[int]) -> dict[str, dict]:
    """posttrain.data.overlap.overlap of every eval suite (its prompts; corpus_eval: its documents) against all
    text the training stages read: the SFT mixture, preference train pairs, corpus train, RL / distill prompts."""
    training = ([text_of(r["prompt"] + r["completion"]) for r in files["sft_train.jsonl"]]
                + [text_of(r["prompt"] + r["chosen"] + r["rejected"]) for r in files["preference_train.jsonl"]]
                + [r["text"] for r in files["corpus_train.jsonl"]]
                + [text_of(r["prompt"]) for r in files["prompts.jsonl"]])
    suites = {s: [text_of(r["prompt"]) for r in files[f"eval_{s}.jsonl"]] for s in ("instruction", "cot", "harmful",
                                                                                   "benign")}
    suites["preference"] = [text_of(r["prompt"]) for r in files["preference_eval.jsonl"]]
    suites["corpus"] = [r["text"] for r in files["corpus_eval.jsonl"]]
    return overlap(training, suites, sizes)


def judge_part(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(pairs for reward and align, pairs for the judge): the judge's are the `share` of pairs whose normalised
    prompt ranks lowest under a seeded hash, so one prompt's pairs all go one way."""
    keys = sorted({key_of("preference", r) for r in rows}, key=lambda k: rank(seed + 1, k))
    judged = set(keys[: round(share * len(keys))])
    return ([r for r in rows if key_of("preference", r) not in judged],
            [r for r in rows if key_of("preference", r) in judged])
