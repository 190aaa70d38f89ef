"""Sample data: a seeded generator of every kind of raw data the lifecycle reads.

The tasks are verifiable (each answer is checkable exactly) so evaluate measures real learning:
reverse / sort / count words, single-digit sums, "how do I ..." requests (benign ones get a helpful
answer, harmful ones a refusal), and two-step word problems with a step-by-step rationale and a
"#### N" final answer. The corpus is domain text written over the same world. Files come in the
formats people have (alpaca JSON, sharegpt JSONL, OpenAI messages JSONL, GSM8K-style CSV,
whole-transcript preference pairs, Parquet prompts) so `prepare` exercises its readers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from posttrain.cli import run_stage
from posttrain.config import TrackingConfig
from posttrain.files import atomic_dir, write_json, write_jsonl
from posttrain.tracking import log_stage_metrics, stage_run

WORDS = ["red", "blue", "green", "fox", "owl", "cat", "river", "stone", "moon", "tree", "lamp", "boat",
         "apple", "cloud", "bell", "sand", "wolf", "rain", "gold", "seed"]
NAMES = ["Sam", "Ada", "Lee", "Mia", "Tom", "Eva", "Ben", "Zoe"]
ITEMS = ["apples", "coins", "books", "shells", "pens", "cards"]
PLACES = ["market", "river", "hill", "library", "harbor", "garden"]
SHARED_VERBS = ["make", "build", "get", "hide", "use", "find"]
BENIGN_OBJECTS = ["kite", "shed", "cake", "garden", "lamp", "boat", "chair", "map", "song", "bridge"]
HARMFUL_OBJECTS = ["bomb", "poison", "weapon", "virus", "explosive", "gun"]
HARMFUL_ACTS = ["steal a car", "hack a bank", "forge a passport", "rob a store", "hurt a person",
                "break into a house"]
REFUSAL = "I can't help with that request."


@dataclass(frozen=True)
class SampleConfig:
    seed: int
    tracking: TrackingConfig
    out_dir: str
    n_corpus_docs: int
    n_instruction: int
    n_refusal: int
    n_cot: int
    n_preference: int
    n_prompts: int


def helpful(verb: str, obj: str) -> str:
    return f"To {verb} a {obj}, gather what you need and work step by step."


def howto_prompt(rng: random.Random, act: str) -> str:
    return rng.choice(["How do I {}?", "Tell me how to {}.", "Explain how to {}."]).format(act)


def harmful_act(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(HARMFUL_ACTS)
    return f"{rng.choice(SHARED_VERBS)} a {rng.choice(HARMFUL_OBJECTS)}"


def instruction(rng: random.Random) -> tuple[str, str, str, str]:
    """(family, instruction, input, answer) for one verifiable task."""
    family = rng.choice(["reverse", "sort", "count", "sum", "howto"])
    if family == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 4))
        return family, "Reverse the words.", " ".join(words), " ".join(reversed(words))
    if family == "sort":
        nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        return family, "Sort the numbers.", " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))
    if family == "count":
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        return family, "Count the words.", " ".join(words), str(len(words))
    if family == "sum":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return family, f"What is {a} plus {b}?", "", str(a + b)
    verb, obj = rng.choice(SHARED_VERBS), rng.choice(BENIGN_OBJECTS)
    return family, howto_prompt(rng, f"{verb} a {obj}"), "", helpful(verb, obj)


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = rng.randint(1, min(9, a + b))
    question = (f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
                f"How many {item} does {name} have now?")
    rationale = f"{name} starts with {a}. {a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
    return question, rationale, a + b - c


def corpus_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(4, 8)):
        kind = rng.randint(0, 5)
        if kind == 0:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            # The fact alone: with "a plus b is c" before it the model learns to copy c, not to add.
            sentences.append(f"{a} + {b} = {a + b}.")
        elif kind == 1:
            s, c = rng.randint(1, 18), rng.randint(0, 9)
            c = min(c, s)
            sentences.append(f"{s} - {c} = {s - c}.")
        elif kind == 2:
            words = rng.sample(WORDS, rng.randint(3, 4))
            sentences.append(f"The words {' '.join(words)} in reverse order are {' '.join(reversed(words))}.")
        elif kind == 3:
            nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
            sentences.append(f"Sorted, the numbers {' '.join(map(str, nums))} read {' '.join(map(str, sorted(nums)))}.")
        elif kind == 4:
            name, place, item = rng.choice(NAMES), rng.choice(PLACES), rng.choice(ITEMS)
            sentences.append(f"{name} walked to the {place} with {rng.randint(1, 9)} {item}.")
        else:
            obj = rng.choice(BENIGN_OBJECTS)
            sentences.append(f"People {rng.choice(SHARED_VERBS)} a {obj} near the {rng.choice(PLACES)}.")
    return " ".join(sentences)


def preference(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): right vs wrong answer, refusal vs compliance, help vs over-refusal."""
    kind = rng.random()
    if kind < 0.2:
        act = harmful_act(rng)
        verb, obj = act.split(" a ", 1)
        return howto_prompt(rng, act), REFUSAL, helpful(verb, obj)
    if kind < 0.35:
        verb, obj = rng.choice(SHARED_VERBS), rng.choice(BENIGN_OBJECTS)
        return howto_prompt(rng, f"{verb} a {obj}"), helpful(verb, obj), REFUSAL
    if kind < 0.6:
        question, rationale, answer = word_problem(rng)
        wrong = answer + rng.choice([-2, -1, 1, 2])
        bad_rationale = rationale.rsplit("=", 1)[0] + f"= {wrong}."
        return question, f"{rationale}\n#### {answer}", f"{bad_rationale}\n#### {wrong}"
    while True:
        family, instr, inp, answer = instruction(rng)
        if family == "howto":
            continue
        if family in ("count", "sum"):
            wrong = str(int(answer) + rng.choice([-1, 1, 2]))
        else:
            parts = answer.split()
            wrong = " ".join(parts[1:] + parts[:1])  # rotated: same tokens, wrong order
        if wrong != answer:  # "6 6 6" rotates to itself: no pair (the contract refuses chosen == rejected)
            return (f"{instr}\n\n{inp}" if inp else instr), answer, wrong


def run(cfg: SampleConfig) -> dict:
    rng = random.Random(cfg.seed)
    out = Path(cfg.out_dir)
    with atomic_dir(out) as tmp:
        corpus = [{"text": corpus_doc(rng)} for _ in range(cfg.n_corpus_docs)]
        write_jsonl(tmp / "corpus.jsonl", corpus)

        alpaca, sharegpt = [], []
        for _ in range(cfg.n_instruction):
            family, instr, inp, answer = instruction(rng)
            if family in ("reverse", "sort", "count"):
                alpaca.append({"instruction": instr, "input": inp, "output": answer})
            else:
                sharegpt.append({"conversations": [{"from": "human", "value": instr}, {"from": "gpt", "value": answer}]})
        (tmp / "instructions_alpaca.json").write_text(json.dumps(alpaca, indent=1))
        write_jsonl(tmp / "instructions_sharegpt.jsonl", sharegpt)

        refusals = [{"messages": [{"role": "user", "content": howto_prompt(rng, harmful_act(rng))},
                                  {"role": "assistant", "content": REFUSAL}]} for _ in range(cfg.n_refusal)]
        write_jsonl(tmp / "refusals.jsonl", refusals)

        cot = []
        for _ in range(cfg.n_cot):
            question, rationale, answer = word_problem(rng)
            cot.append({"question": question, "answer": f"{rationale}\n#### {answer}"})
        pd.DataFrame(cot).to_csv(tmp / "cot.csv", index=False)

        prefs = []
        for _ in range(cfg.n_preference):
            prompt, chosen, rejected = preference(rng)
            prefs.append({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                          "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"})
        write_jsonl(tmp / "preferences.jsonl", prefs)

        prompts = []
        for _ in range(cfg.n_prompts):
            if rng.random() < 0.5:
                question, _, answer = word_problem(rng)
                prompts.append({"prompt": question, "answer": str(answer)})
            else:
                family, instr, inp, answer = instruction(rng)
                prompts.append({"prompt": f"{instr}\n\n{inp}" if inp else instr, "answer": answer})
        pd.DataFrame(prompts).to_parquet(tmp / "prompts.parquet", index=False)

    metrics = {"corpus_docs": len(corpus), "instruction_alpaca": len(alpaca), "instruction_sharegpt": len(sharegpt),
               "refusal": len(refusals), "cot": len(cot), "preference": len(prefs), "prompts": len(prompts)}
    with stage_run("sample", cfg):
        log_stage_metrics(metrics)
    write_json("metrics/sample.json", metrics)
    return metrics


if __name__ == "__main__":
    run_stage("sample", SampleConfig, run)
