"""Generation speed of the stages' decoding path next to a plain `model.generate` loop, same prompts, on CPU.

    .venv/bin/python -m bench.generation                          # SmolLM2 (real profile), data and model built here
    .venv/bin/python -m bench.generation --workdir DIR            # reuse a folder a real-profile run built
    .venv/bin/python -m bench.generation --max-per-suite 10 --rft-prompts 8 --threads 2

The workloads are the real profile's (profiles/real.yaml over params.yaml): evaluate's four held-out suites
(greedy, evaluate.max_new_tokens) and rft's sampling (rft.num_samples completions per prompt at rft.temperature,
rft.max_new_tokens), on SmolLM2-135M-Instruct converted by stages.base, with the prompts prepare wrote. Without
--workdir the bench runs stages sample, prepare and base in a temp folder first (1-2 min).

Variants, each on the same prompts with the same max_new_tokens, every row stopping at eos:
  plain_loop     model.generate one prompt at a time, library defaults (what a script without batching does)
  plain_batched  model.generate on batches of the stage's batch size in file order, left-padded
  hf_sorted      the stages' path with decode.engine=hf: batches of similar length, then model.generate
  ours           the stages' path as params.yaml `defaults.decode` says (engine compact: finished rows leave
                 the batch and its KV cache)
It prints wall seconds, new tokens (up to and including eos) per second, the ratio to plain_loop, and whether
the greedy answers equal plain_loop's (sampled ones cannot). Figures are medians of --rounds runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import build_with_stages, load, machine, median, table  # noqa: E402


def workloads(work: Path, params: dict, max_per_suite: int, rft_prompts: int) -> dict[str, dict]:
    from posttrain.core.files import read_jsonl
    from stages.rft import checkable

    ev, rft = params["evaluate"], params["rft"]
    data = work / ev["data_dir"]
    suites = [r["prompt"] for s in ("cot", "instruction", "harmful", "benign")
              for r in read_jsonl(data / f"eval_{s}.jsonl")[: min(max_per_suite, ev["max_per_suite"])]]
    rft_rows = checkable(str(work / rft["train_file"]), min(rft_prompts, rft["max_prompts"]))
    return {
        "evaluate suites": {"prompts": suites, "max_new_tokens": ev["max_new_tokens"], "batch_size": ev["batch_size"],
                            "k": 1, "temperature": 0.0},
        "rft samples": {"prompts": [r["prompt"] for r in rft_rows], "max_new_tokens": rft["max_new_tokens"],
                        "batch_size": rft["batch_size"], "k": rft["num_samples"], "temperature": rft["temperature"]},
    }


def plain(model, tokenizer, batch_size: int, w: dict) -> tuple[list[list[str]], int]:
    """(answers, new tokens): model.generate on `batch_size` prompts at a time in file order (1: a prompt at a time)."""
    from posttrain.evaluation.chat import encode_prompts
    from posttrain.evaluation.decoding import until_stop

    out, tokens = [], 0
    sampling = {"do_sample": True, "temperature": w["temperature"], "top_k": 0, "top_p": 1.0} if w["temperature"] else {}
    for i in range(0, len(w["prompts"]), batch_size):
        enc = encode_prompts(tokenizer, w["prompts"][i : i + batch_size], model.device)
        ids = model.generate(**enc, max_new_tokens=w["max_new_tokens"], num_return_sequences=w["k"],
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        rows = [until_stop(r, [tokenizer.eos_token_id]) for r in ids[:, enc["input_ids"].shape[1]:].tolist()]
        tokens += sum(map(len, rows))
        texts = [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
        out += [texts[j : j + w["k"]] for j in range(0, len(texts), w["k"])]
    return out, tokens


def ours(model, tokenizer, decode, w: dict) -> tuple[list[list[str]], int]:
    """(answers, new tokens) through the stages' decoding path."""
    from posttrain.evaluation.decoding import decode_prompts

    stats = {}
    out = decode_prompts(model, tokenizer, w["prompts"], w["max_new_tokens"], w["batch_size"], decode,
                         num_return_sequences=w["k"], temperature=w["temperature"], desc="bench", stats=stats)
    return out, stats["new_tokens"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="a folder with data/processed and models/base from a real-profile run")
    p.add_argument("--max-per-suite", type=int, default=10, help="prompts per evaluate suite (and the profile's cap)")
    p.add_argument("--rft-prompts", type=int, default=8, help="rft prompts (and the profile's max_prompts)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--variants", nargs="+", default=["plain_loop", "plain_batched", "hf_sorted", "ours"])
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    import dataclasses

    import torch
    import yaml

    from posttrain.core.config import overlaid, read_params
    from posttrain.evaluation.decoding import DecodeConfig
    from posttrain.model.loading import load_model, load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    params = overlaid(read_params(REPO / "params.yaml"), yaml.safe_load((REPO / "profiles/real.yaml").read_text()))
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as scratch:
        if a.workdir:
            work = Path(a.workdir)
        else:
            start = time.perf_counter()
            work = build_with_stages(Path(scratch) / "real", ["sample", "prepare", "base"], {}, profile="real").parent.parent
            print(f"sample, prepare and base (SmolLM2 converted) in {time.perf_counter() - start:.0f} s", flush=True)
        model, tokenizer = load_model(work / "models/base"), load_tokenizer(work / "models/base")
        model.eval()
        decode = DecodeConfig(**params["defaults"]["decode"])
        runs = {
            "plain_loop": lambda w: plain(model, tokenizer, 1, w),
            "plain_batched": lambda w: plain(model, tokenizer, w["batch_size"], w),
            "hf_sorted": lambda w: ours(model, tokenizer, dataclasses.replace(decode, engine="hf"), w),
            "ours": lambda w: ours(model, tokenizer, decode, w),
        }
        results, rows = [], []
        for name, w in workloads(work, params, a.max_per_suite, a.rft_prompts).items():
            base, answers = None, {}
            for variant in a.variants:
                walls, tokens = [], []
                for r in range(a.rounds):
                    torch.manual_seed(r)
                    start = time.perf_counter()
                    with torch.no_grad():
                        answers[variant], n = runs[variant](w)
                    walls.append(time.perf_counter() - start)
                    tokens.append(n)
                wall, n = median(walls), median(tokens)
                base = base or (n / wall)
                same = ("n/a (sampled)" if w["temperature"] else
                        f"{sum(x == y for x, y in zip(answers[variant], answers[a.variants[0]]))}/{len(w['prompts'])}")
                res = {"workload": name, "variant": variant, "prompts": len(w["prompts"]), "k": w["k"],
                       "batch_size": 1 if variant == "plain_loop" else w["batch_size"],
                       "max_new_tokens": w["max_new_tokens"], "wall_s": wall, "new_tokens": n,
                       "tokens_per_s": n / wall, "vs_plain_loop": (n / wall) / base, "same_answers": same}
                results.append(res)
                rows.append([name, variant, res["batch_size"], wall, n, n / wall, f"{res['vs_plain_loop']:.2f}x", same])
                print(json.dumps(res), flush=True)
    print(f"\nSmolLM2-135M-Instruct on {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {load()}, decode {decode}")
    print(table(["workload", "variant", "batch", "wall s", "new tokens", "tokens/s", "vs plain_loop",
                 "same answers as plain_loop"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
