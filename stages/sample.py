"""sample: writes the sample data, a seeded set of every kind of raw data the lifecycle reads
(posttrain/data/sample_data.py generates it).

Files come in the formats people have (alpaca JSON, sharegpt JSONL, OpenAI messages JSONL, prompt/response JSONL,
GSM8K-style CSV, whole-transcript and prompt/chosen/rejected preference pairs, Parquet prompts) so `prepare`
exercises its readers. The heldout_* files hold only pairings of values no training file has, and prepare puts
them only into eval splits (prepare.sources: split: eval). So the suites measure generalisation to new
combinations of familiar values, not recall: an eval word problem adds a pair no training problem adds, an eval
harmful request names an act no training refusal names.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from posttrain.core.cli import run_stage
from posttrain.core.config import TrackingConfig
from posttrain.core.files import atomic_dir, write_json, write_jsonl
from posttrain.core.tracking import log_stage_metrics, stage_run
from posttrain.data.sample_data import (HOWTO, REFUSAL, corpus_doc, harmful_act,  # noqa: F401 (HOWTO: tests)
                                        howto_prompt, instruction, preference, task, word_problem, write_heldout)

STAGE = "sample"


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
    n_eval: int  # rows of each heldout_* file (distinct prompts; fewer where the held-out space is smaller)


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
                sharegpt.append({"conversations": [{"from": "human", "value": instr},
                                                   {"from": "gpt", "value": answer}]})
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
                prompt, answer = task(rng)
                prompts.append({"prompt": prompt, "answer": answer})
        pd.DataFrame(prompts).to_parquet(tmp / "prompts.parquet", index=False)
        heldout = write_heldout(tmp, rng, cfg.n_eval)

    metrics = {"corpus_docs": len(corpus), "instruction_alpaca": len(alpaca), "instruction_sharegpt": len(sharegpt),
               "refusal": len(refusals), "cot": len(cot), "preference": len(prefs), "prompts": len(prompts), **heldout}
    with stage_run(STAGE, cfg):
        log_stage_metrics(metrics)
    write_json(f"metrics/{STAGE}.json", metrics)
    return metrics


if __name__ == "__main__":
    run_stage(STAGE, SampleConfig, run)
