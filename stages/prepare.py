"""prepare: raw data in the formats people have -> validated, deduplicated, split data and the SFT mixture.

    python -m stages.prepare [--params params.yaml]

1. read and validate every source (posttrain.readers, schemas/), renaming its columns where it maps them:
   with on_bad_rows=stop one bad row stops the stage, with a report naming file, row, column and check,
   before anything is written; with drop the bad rows are left out and listed in rejects.jsonl, unless a
   source's share of them exceeds max_bad_share (then it stops, as with stop);
2. dedupe within each kind by normalised content: the prompt (the text for the corpus) lowercased, with
   punctuation and whitespace folded and numbers kept (posttrain.overlap.normalise), first kept;
3. split each kind into train / eval by each source's `split`: `auto` (the default, for your own files) by a
   seeded hash of the normalised prompt, eval_fraction of the rows; `eval` every row held out (the sample's
   heldout_* files: pairings no training file has); `train` every row trained on. A kind's eval split is at
   most max_eval_per_suite: auto rows beyond it go to train, eval-only rows are left out (never trained on);
4. drop from every train split the examples whose normalised prompt is held out in any kind's eval split;
5. drop from the corpus train split every document that contains an eval prompt, normalised: any
   decontaminate.ngram-gram of it, or the whole prompt when it is shorter (GPT-3's 13-gram check);
6. draw the SFT mixture (instruction + refusal + cot) at the configured ratios from the train splits,
   repeating examples only where a kind has too few;
7. measure what is left: the n-gram overlap (overlap_ngrams) between the training files (sft_train,
   preference_train, corpus_train, prompts) and each eval suite;
8. write everything to out_dir in one rename, metrics/prepare.json, and the MLflow run.

Outputs (messages are OpenAI-style [{"role", "content"}]; prompt-completion / preference rows follow TRL):
  corpus_{train,eval}.jsonl       {"text"}
  sft_{train,eval}.jsonl          {"prompt": messages, "completion": [assistant], "source": kind}
  eval_instruction.jsonl          {"prompt", "answer"}     eval_cot.jsonl   {"prompt", "answer": final answer}
  eval_harmful.jsonl              {"prompt"}               eval_benign.jsonl {"prompt"} (instruction eval prompts)
  preference_{train,eval,judge}.jsonl   {"prompt", "chosen": [assistant], "rejected": [assistant]}
                                  (judge: a disjoint share of the train pairs, for the independent judge)
  prompts.jsonl                   {"prompt", "answer": str or null}   (all prompts: no split)
  rejects.jsonl                   {"file", "row", "unit", "problems": [{"column", "check", "error"}], "raw"}
                                  (the rows on_bad_rows=drop left out; empty under stop)
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from posttrain.cli import run_stage
from posttrain.config import ConfigError, TrackingConfig
from posttrain.files import atomic_dir, write_json, write_jsonl
from posttrain.overlap import contains_any, normalise, overlap, probes, tokens
from posttrain.readers import DataError, Problem, read_sources

SFT_KINDS = ("instruction", "refusal", "cot")
SPLIT_KINDS = ("corpus", "instruction", "refusal", "cot", "preference")  # prompts are not split
METRICS_FILE = "metrics/prepare.json"
REJECTS_FILE = "rejects.jsonl"  # in out_dir: versioned with the data it was left out of


@dataclass(frozen=True)
class SourceConfig:
    path: str
    kind: Literal["corpus", "instruction", "refusal", "cot", "preference", "prompt"]  # layout is auto-detected
    columns: dict[str, str] = field(default_factory=dict)  # {their column: our column}; most files need none
    split: Literal["auto", "train", "eval"] = "auto"  # auto: by hash; train / eval: every row there
    optional: bool = False  # true: a missing or empty file is no rows (votes the arena has not written yet)


@dataclass(frozen=True)
class MixtureConfig:
    size: int  # examples in sft_train.jsonl
    ratios: dict[str, float]  # kind -> share of the mixture; sums to 1

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"[prepare.mixture.size] must be at least 1, got {self.size}")
        unknown = sorted(set(self.ratios) - set(SFT_KINDS))
        if unknown:
            raise ConfigError(f"[prepare.mixture.ratios] unknown kind(s) {unknown} (known: {list(SFT_KINDS)})")
        negative = {k: r for k, r in self.ratios.items() if r < 0}
        if negative:
            raise ConfigError(f"[prepare.mixture.ratios] must not be negative, got {negative}")
        total = sum(self.ratios.values())
        if abs(total - 1) > 1e-6:
            raise ConfigError(f"[prepare.mixture.ratios] must sum to 1, got {total:g} ({self.ratios})")


@dataclass(frozen=True)
class DecontaminateConfig:
    ngram: int  # a corpus train document sharing an n-gram this long with an eval prompt is dropped
    min_tokens: int  # a shorter eval prompt counts whole, if it has at least this many tokens

    def __post_init__(self):
        if self.ngram < 1 or self.min_tokens < 1:
            raise ConfigError(f"[prepare.decontaminate] ngram and min_tokens must be >= 1, got {self}")


@dataclass(frozen=True)
class PrepareConfig:
    seed: int
    tracking: TrackingConfig
    sources: list[SourceConfig]
    eval_fraction: float  # held-out share of each kind's split: auto rows after dedupe
    max_eval_per_suite: int  # cap on each kind's eval split (auto rows past it train, eval-only ones are left out)
    mixture: MixtureConfig
    decontaminate: DecontaminateConfig
    overlap_ngrams: list[int]  # n-gram sizes of the train / eval overlap in metrics/prepare.json
    judge_share: float  # preference train pairs set apart for the judge (preference_judge.jsonl): never reward's
    on_bad_rows: Literal["stop", "drop"]  # drop: leave bad rows out, listed in out_dir/rejects.jsonl
    max_bad_share: float  # drop: a source with a larger share of bad rows still stops the stage
    out_dir: str

    def __post_init__(self):
        if not 0 <= self.max_bad_share <= 1:
            raise ConfigError(f"[prepare.max_bad_share] must be in [0, 1], got {self.max_bad_share}")
        if not 0 <= self.judge_share < 1:
            raise ConfigError(f"[prepare.judge_share] must be in [0, 1), got {self.judge_share}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"[prepare.eval_fraction] must be in [0, 1), got {self.eval_fraction}")
        if self.max_eval_per_suite < 0:
            raise ConfigError(f"[prepare.max_eval_per_suite] must be >= 0, got {self.max_eval_per_suite}")
        if not self.sources:
            raise ConfigError("[prepare.sources] lists no sources")
        unsplit = [i for i, s in enumerate(self.sources) if s.kind == "prompt" and s.split == "eval"]
        if unsplit:
            raise ConfigError(f"[prepare.sources[{unsplit[0]}].split] prompts are not split: auto or train")
        if not self.overlap_ngrams or min(self.overlap_ngrams) < 1:
            raise ConfigError(f"[prepare.overlap_ngrams] must list sizes >= 1, got {self.overlap_ngrams}")
        kinds = {s.kind for s in self.sources}
        orphans = [k for k, r in self.mixture.ratios.items() if r > 0 and k not in kinds]
        if orphans:
            raise ConfigError(f"[prepare.mixture.ratios] {orphans} have a share but no source in prepare.sources")


# ---------------------------------------------------------------- steps


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
    return normalise(row["text"] if kind == "corpus" else text_of(prompt_of(kind, row)))


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
    both, and step 4 drops few rows. The order is pseudo-random, so any prefix of eval is a fair sample of it.
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
    """posttrain.overlap.overlap of every eval suite (its prompts; corpus_eval: its documents) against all
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


def mixture_counts(size: int, ratios: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: counts sum to `size`, each within 1 of size * ratio."""
    exact = {k: size * r for k, r in ratios.items()}
    counts = {k: int(x) for k, x in exact.items()}
    by_remainder = sorted(ratios, key=lambda k: (exact[k] - counts[k], -list(ratios).index(k)), reverse=True)
    for k in by_remainder[: size - sum(counts.values())]:
        counts[k] += 1
    return counts


def build_mixture(train: dict[str, list[dict]], size: int, ratios: dict[str, float], seed: int):
    """[(kind, row)] of `size` drawn at `ratios`; with replacement only for a kind with too few rows."""
    rng = random.Random(f"{seed}:mixture")
    picked, report = [], {}
    for kind, want in mixture_counts(size, ratios).items():
        pool = train.get(kind, [])
        if want and not pool:
            raise DataError([Problem("prepare.mixture", f"'{kind}' has ratio {ratios[kind]} but no train examples")])
        if want <= len(pool):
            rows = rng.sample(pool, want)
        else:  # every example once, then repeats drawn at random
            rows = rng.sample(pool, len(pool)) + rng.choices(pool, k=want - len(pool))
        picked += [(kind, row) for row in rows]
        report[kind] = {"count": want, "share": want / size, "target": ratios[kind], "available": len(pool),
                        "upsampled": want > len(pool), "repeated": max(0, want - len(pool))}
    rng.shuffle(picked)
    by_source = Counter(row["_source"] for _, row in picked)
    sources = {src: {"count": n, "share": n / size} for src, n in sorted(by_source.items())}
    return picked, {"size": size, "kinds": report, "sources": sources}


# ---------------------------------------------------------------- output rows


def sft_row(kind: str, row: dict) -> dict:
    if kind == "instruction":
        completion = [row["messages"][-1]]
    elif kind == "refusal":
        completion = assistant(row["response"])
    else:
        completion = assistant(f"{row['rationale']}\n#### {row['answer']}")
    return {"prompt": prompt_of(kind, row), "completion": completion, "source": kind}


def preference_row(row: dict) -> dict:
    return {"prompt": row["prompt"], "chosen": assistant(row["chosen"]), "rejected": assistant(row["rejected"])}


def judge_part(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(pairs for reward and align, pairs for the judge): the judge's are the `share` of pairs whose normalised
    prompt ranks lowest under a seeded hash, so one prompt's pairs all go one way."""
    keys = sorted({key_of("preference", r) for r in rows}, key=lambda k: rank(seed + 1, k))
    judged = set(keys[: round(share * len(keys))])
    return ([r for r in rows if key_of("preference", r) not in judged],
            [r for r in rows if key_of("preference", r) in judged])


def outputs(train: dict, held: dict, prompts: list[dict], mixture: list, sft_kinds: list[str],
            judge: list[dict]) -> dict[str, list]:
    """File name -> rows, for every file prepare writes (empty where a kind has no source)."""
    return {
        "corpus_train.jsonl": [{"text": r["text"]} for r in train["corpus"]],
        "corpus_eval.jsonl": [{"text": r["text"]} for r in held["corpus"]],
        "sft_train.jsonl": [sft_row(kind, r) for kind, r in mixture],
        "sft_eval.jsonl": [sft_row(kind, r) for kind in sft_kinds for r in held[kind]],
        "eval_instruction.jsonl": [{"prompt": prompt_of("instruction", r), "answer": r["messages"][-1]["content"]}
                                   for r in held["instruction"]],
        "eval_cot.jsonl": [{"prompt": prompt_of("cot", r), "answer": r["answer"]} for r in held["cot"]],
        "eval_harmful.jsonl": [{"prompt": prompt_of("refusal", r)} for r in held["refusal"]],
        "eval_benign.jsonl": [{"prompt": prompt_of("instruction", r)} for r in held["instruction"]],
        "preference_train.jsonl": [preference_row(r) for r in train["preference"]],
        "preference_eval.jsonl": [preference_row(r) for r in held["preference"]],
        "preference_judge.jsonl": [preference_row(r) for r in judge],
        "prompts.jsonl": [{"prompt": prompt_of("prompt", r), "answer": r["answer"]} for r in prompts],
    }


# ---------------------------------------------------------------- stage


def input_names(cfg: PrepareConfig) -> dict[str, str]:
    names: dict[str, str] = {}
    for i, s in enumerate(present(cfg.sources)):
        name = Path(s.path.removesuffix(".gz")).stem
        names[name if name not in names else f"{name}_{i}"] = s.path
    return names


def present(sources: list[SourceConfig]) -> list[SourceConfig]:
    """The sources to read: an optional one whose file is missing or empty has no rows yet."""
    return [s for s in sources if not (s.optional and (not Path(s.path).is_file() or Path(s.path).stat().st_size == 0))]


def run(cfg: PrepareConfig) -> dict:
    sources = present(cfg.sources)
    tables = read_sources(((s.path, s.kind, s.columns) for s in sources),  # raises DataError; nothing written yet
                          cfg.on_bad_rows, cfg.max_bad_share)
    rejects = [r.to_json() for t in tables for r in t.rejects]
    rows: dict[str, list[dict]] = {kind: [] for kind in (*SPLIT_KINDS, "prompt")}
    for t, source in zip(tables, sources):  # read_sources keeps the order of the sources
        rows[t.kind] += [{**r, "_split": source.split} for r in t.rows]
    unique = {kind: dedupe(kind, r) for kind, r in rows.items()}

    train, held = {}, {}
    for kind in SPLIT_KINDS:
        train[kind], held[kind] = split(kind, unique[kind], cfg.eval_fraction, cfg.max_eval_per_suite, cfg.seed)
    train["prompt"] = unique["prompt"]
    held_out = {key_of(k, r) for k in SPLIT_KINDS if k != "corpus" for r in held[k]}
    clean = {k: [r for r in v if k == "corpus" or key_of(k, r) not in held_out] for k, v in train.items()}
    eval_prompts = [text_of(prompt_of(k, r)) for k in SPLIT_KINDS if k != "corpus" for r in held[k]]
    clean["corpus"] = decontaminate(clean["corpus"], eval_prompts, cfg.decontaminate.ngram,
                                    cfg.decontaminate.min_tokens)

    sft_kinds = [k for k in SFT_KINDS if cfg.mixture.ratios.get(k, 0) > 0]
    ratios = {k: cfg.mixture.ratios[k] for k in sft_kinds}
    mixture, mixture_report = build_mixture(clean, cfg.mixture.size, ratios, cfg.seed)
    clean["preference"], judge = judge_part(clean["preference"], cfg.judge_share, cfg.seed)
    files = outputs(clean, held, clean["prompt"], mixture, sft_kinds, judge)

    metrics = {
        "sources": {t.path: {"kind": t.kind, "layout": t.layout, "rows": len(t.rows), "dropped": len(t.rejects),
                             "dropped_share": len(t.rejects) / t.total} for t in tables},
        "dropped": len(rejects),  # bad rows left out (on_bad_rows=drop), all in out_dir/rejects.jsonl
        "dedupe": {k: {"rows": len(rows[k]), "duplicates": len(rows[k]) - len(unique[k]), "unique": len(unique[k])}
                   for k in rows},
        "split": {k: {"train": len(clean[k]), "eval": len(held[k])} for k in SPLIT_KINDS},
        "eval_only_left_out": {k: sum(r["_split"] == "eval" for r in unique[k])
                               - sum(r["_split"] == "eval" for r in held[k]) for k in SPLIT_KINDS},  # past the cap
        "held_out_prompts_dropped_from_train": {k: len(train[k]) - len(clean[k]) for k in train if k != "corpus"},
        "decontaminate": {"ngram": cfg.decontaminate.ngram, "min_tokens": cfg.decontaminate.min_tokens,
                          "eval_prompts": len(eval_prompts), "corpus_checked": len(train["corpus"]),
                          "corpus_dropped": len(train["corpus"]) - len(clean["corpus"])},
        "mixture": mixture_report,
        "outputs": {name.removesuffix(".jsonl"): len(r) for name, r in files.items()},
        "overlap": overlap_report(files, cfg.overlap_ngrams),
    }
    from posttrain.tracking import log_stage_metrics, stage_run

    with stage_run("prepare", cfg, inputs=input_names(cfg)):
        with atomic_dir(cfg.out_dir) as tmp:
            for name, out_rows in files.items():
                write_jsonl(tmp / name, out_rows)
            write_jsonl(tmp / REJECTS_FILE, rejects)
        write_json(METRICS_FILE, metrics)
        log_stage_metrics(metrics)
    return metrics


if __name__ == "__main__":
    run_stage("prepare", PrepareConfig, run)
