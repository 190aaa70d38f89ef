"""Data preparation at scale: prepare + tokenisation of N synthetic examples (default 100k), timed per step.

    python -m bench.prepare_scale                    # 100k examples
    python -m bench.prepare_scale --examples 5000    # a quick look

In a temporary copy (never the checkout's data/): the sample stage writes N raw examples in the default's mix
of kinds and layouts (untimed: it stands in for your data), then the real stages run, timed:
  prepare        read + validate (pandera) + dedupe + split + mixture: python -m stages.prepare's run()
  tokenise sft   TRL's dataset preparation for the SFT mixture (chat template, tokenise, completion mask,
                 truncation), exactly as stages.sft builds its trainer (its SFTConfig from params.yaml)
  tokenise cpt   the same for the corpus, packed into blocks as stages.cpt does
The SFT mixture is set to every SFT-kind example (prepare.mixture.size) so all N are tokenised. The tokenizer is
the base stage's BPE (trained on the prepared text, timed separately: it is base's work, not prepare's).
TRL tokenises with the fast (Rust) tokenizer in batched datasets.map calls, in one process (dataset_num_proc is
not set; on 2 cores one process already meets the target).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import load, machine, table  # noqa: E402

# the default's shares of each kind (params.yaml sample: corpus 3000, instructions 3000, ...)
SHARES = {"n_corpus_docs": 3000, "n_instruction": 3000, "n_refusal": 600, "n_cot": 1500, "n_preference": 1500,
          "n_prompts": 400}


def scaled_params(n: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    total = sum(SHARES.values())
    params["sample"].update({k: max(1, round(n * v / total)) for k, v in SHARES.items()})
    sft_kinds = params["sample"]["n_instruction"] + params["sample"]["n_refusal"] + params["sample"]["n_cot"]
    params["prepare"]["mixture"]["size"] = int(sft_kinds * (1 - params["prepare"]["eval_fraction"]))
    params["tracking"]["log_models"] = False
    return params


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def tokenise(stage: str, params: dict) -> tuple[int, float]:
    """Build the stage's trainer on the base model; return (rows, seconds to read + prepare its data, rows after)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from posttrain.core.config import load_config
    from posttrain.core.files import read_jsonl
    from posttrain.model.loading import load_model, load_tokenizer
    from stages import cpt, sft

    module, cls = (sft, sft.SFTStageConfig) if stage == "sft" else (cpt, cpt.CPTConfig)
    cfg = load_config(stage, cls, params=params)
    tokenizer, model = load_tokenizer("models/base"), load_model("models/base")
    with tempfile.TemporaryDirectory() as out:
        args = module.training_args(cfg, out)
        args.report_to = []
        start = time.perf_counter()
        if stage == "sft":
            ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                    for r in read_jsonl(cfg.train_file)])
        else:
            ds = Dataset.from_list([{"text": r["text"]} for r in read_jsonl(cfg.train_file)])
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        seconds = time.perf_counter() - start
    return len(ds), seconds, len(trainer.train_dataset)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.prepare_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--workdir", help="where to run (default: a new temp dir)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    from posttrain.core.config import load_config
    from stages import base, prepare, sample

    out_json = Path(a.json).resolve() if a.json else None
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="prepare-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    params = scaled_params(a.examples)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    os.chdir(workdir)
    print(f"# prepare scale: {machine()}; {a.examples:,} examples; workdir {workdir}; load before {load()}",
          flush=True)

    def cfg(stage, cls):
        return load_config(stage, cls, params=params)

    sampled, t_sample = timed(sample.run, cfg("sample", sample.SampleConfig))
    n_raw = sum(sampled.values())
    prepared, t_prepare = timed(prepare.run, cfg("prepare", prepare.PrepareConfig))
    _, t_base = timed(base.run, cfg("base", base.BaseConfig))
    sft_rows, t_sft, _ = tokenise("sft", params)
    cpt_rows, t_cpt, cpt_blocks = tokenise("cpt", params)
    total = t_prepare + t_sft + t_cpt
    rows = [["sample (writes the raw data; untimed)", n_raw, t_sample, n_raw / t_sample],
            ["prepare: read, validate, dedupe, split, mixture", n_raw, t_prepare, n_raw / t_prepare],
            ["tokenise sft mixture (TRL, chat template)", sft_rows, t_sft, sft_rows / t_sft],
            [f"tokenise cpt corpus (packed into {cpt_blocks:,} blocks)", cpt_rows, t_cpt, cpt_rows / t_cpt],
            ["**prepare + tokenisation**", n_raw, total, n_raw / total],
            ["base: train the BPE tokenizer (for reference)", "", t_base, ""]]
    print(f"\nload after {load()}\n")
    print(table(["step", "rows", "seconds", "rows/s"], rows))
    print(f"\nprepare + tokenisation of {n_raw:,} examples: {total:.1f} s (target < 60 s)")
    result = {"examples": n_raw, "sample_s": t_sample, "prepare_s": t_prepare, "tokenise_sft_s": t_sft,
              "tokenise_cpt_s": t_cpt, "total_s": total, "base_s": t_base, "sft_rows": sft_rows,
              "cpt_rows": cpt_rows, "machine": machine(), "prepare_metrics_outputs": prepared.get("outputs")}
    if out_json:
        out_json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
