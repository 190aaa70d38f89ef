"""Training throughput: our pipeline's settings (params.yaml) next to stock TRL, same model, data and machine.

    python -m bench.throughput                      # CPU: Llama 4 layers x 256 wide, vocab 8k, batch 8, 10 steps
    python -m bench.throughput --device cuda --shape qwen0.5b --steps 60    # GPU: Qwen2.5-0.5B shape, bf16
    python -m bench.throughput --weights DIR --batch 4 --max-length 512    # a pretrained model's real weights
                                    # (e.g. SmolLM2-135M: models/base of a `profile: real` run)

Each variant trains SFT (and CPT) with TRL's SFTTrainer for N steps in a fresh process of its own (clean
peak memory), interleaved with the other variants and repeated; the table gives medians of real (non-pad)
tokens per second, the achieved training FLOP/s (6 x params x tokens/s), MFU where the device has a known
peak, and peak memory next to posttrain.train.plan's estimate. Tokens/s and MFU are given over the whole run and after
the first --warmup-steps (kernel compilation and autotuning on a GPU).

Variants:
  trl_default          SFTConfig with TRL's defaults (bf16 only where TRL turns it on: a bf16 GPU)
  trl_packing          + packing=True (TRL's best-fit-decreasing packing, padding-free)
  trl_group_by_length  + train_sampling_strategy="group_by_length"
  trl_padding_free     + padding_free=True
  trl_liger            + use_liger_kernel=True (only where liger-kernel is installed)
  ours                 the stage's own SFTConfig: stages.sft.training_args / stages.cpt.training_args on the
                       params.yaml section (override with --set sft.train.batch_size=16 etc., like dvc exp -S);
                       only steps, batch size, max_length, logging and checkpointing are set by the bench.
                       On a GPU with liger-kernel installed, `kernels: auto` gives it Liger's layer kernels
                       (--ablate kernels=torch is the same run without them).

`--weights` trains a pretrained model folder as it is (its own shape, vocabulary and weights) instead of a random
init; the table then also gives the LM head's share of the matmul FLOPs per token, which a large vocabulary
makes big. The data is pre-tokenised and random (no tokenizer or download needed), with long-tailed lengths
(log-normal, clipped to 32..max_length); SFT rows carry a prompt share whose loss is masked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import load, machine, median, rss_mb, run_worker, table  # noqa: E402

SHAPES = {
    # what the issue measured on 2 CPU cores
    "cpu": dict(arch="llama", vocab=8192, hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, max_length=1024),
    # Qwen2.5-0.5B (494 M parameters), random init: the GPU anchor
    "qwen0.5b": dict(arch="qwen2", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                     max_length=1024),
    # the embedded default's model (params.yaml base.tiny, sft.train.max_length)
    "default": dict(arch="llama", vocab=768, hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384,
                    max_length=256),
    # smoke tests
    "tiny": dict(arch="llama", vocab=512, hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, max_length=128),
}
STOCK = {
    "trl_default": {},
    "trl_packing": {"packing": True},
    "trl_group_by_length": {"train_sampling_strategy": "group_by_length"},
    "trl_padding_free": {"padding_free": True},
    "trl_liger": {"use_liger_kernel": True},
}
CPT_VARIANTS = ["trl_default", "trl_packing", "ours"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


# ---------------------------------------------------------------- model and data


def weights_shape(folder: str, max_length: int) -> dict:
    """The shape of a pretrained model folder, as SHAPES gives it for the random ones."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    return dict(arch=c.model_type, vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, intermediate=c.intermediate_size,
                max_length=max_length, weights=str(Path(folder).resolve()))


def lm_head_share(model) -> float:
    """The LM head's share of a token's forward matmul FLOPs: vocab x hidden over that plus every other matrix
    (embedding lookups cost no matmul)."""
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return head / (total - embed + (head if tied else 0))


def build_model(shape: dict, seed: int):
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if shape.get("weights"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(shape["weights"], dtype=torch.float32)
    if torch.cuda.is_available():  # initialise on the GPU: 494 M parameters' random init takes ~15 s on its CPU
        torch.set_default_device("cuda")
    cls, config_cls = (Qwen2ForCausalLM, Qwen2Config) if shape["arch"] == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    config = config_cls(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], max_position_embeddings=max(shape["max_length"], 2048),
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    model = cls(config)
    torch.set_default_device(None)
    return model


def step_clock(trainer):
    """A TrainerCallback whose `marks` get (wall time, SFTTrainer's running count of real tokens) at each step's
    end, so that the steps after a warm-up (CUDA/Triton kernel compilation and autotuning, allocator growth)
    can be timed apart from it."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), trainer._total_train_tokens))

    return StepClock()


def step_profiler(first_step: int, steps: int, out_file: Path):
    """A TrainerCallback that runs torch.profiler over `steps` steps from `first_step` (after the warm-up) and
    writes the ops that took the most device time (CPU time without a GPU) to `out_file`."""
    import torch
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    class StepProfiler(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step:
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == first_step + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                table = self.profiler.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
                out_file.write_text(f"# steps {first_step + 1}-{first_step + steps}, sorted by {key}\n{table}\n")
                self.profiler = None

    return StepProfiler()


def steady_tokens_per_s(marks: list[tuple[float, int]], warmup_steps: int) -> float | None:
    """Real tokens per second over the steps after the first `warmup_steps` (at least 1)."""
    if not 1 <= warmup_steps < len(marks):
        return None
    (t0, n0), (t1, n1) = marks[warmup_steps - 1], marks[-1]
    return (n1 - n0) / (t1 - t0)


def build_tokenizer():
    """A four-token tokenizer: the data is already token ids, the trainer only needs pad/eos."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL)}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def lengths(n: int, max_length: int, seed: int, min_length: int = 32, median_length: float = 160,
            sigma: float = 0.8) -> list[int]:
    """Long-tailed example lengths: log-normal around `median_length`, clipped to [min_length, max_length]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scale = max_length / 1024  # the tiny shape keeps the same distribution, shrunk
    raw = rng.lognormal(math.log(median_length * scale), sigma, n)
    return np.clip(raw, max(4, int(min_length * scale)), max_length).astype(int).tolist()


def build_dataset(stage: str, n: int, shape: dict, seed: int):
    """SFT: input_ids + completion_mask (prompt share 20-60 %, masked); CPT: documents of input_ids."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed + 1)
    rows = []
    for length in lengths(n, shape["max_length"], seed):
        ids = rng.integers(len(SPECIAL), shape["vocab"], length).tolist()
        if stage == "sft":
            prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
            rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
        else:
            rows.append({"input_ids": ids})
    return Dataset.from_list(rows)


# ---------------------------------------------------------------- training arguments


def set_override(params: dict, assignment: str) -> None:
    """'sft.train.batch_size=16' -> params['sft']['train']['batch_size'] = 16 (YAML-typed), like dvc exp -S."""
    import yaml

    key, _, value = assignment.partition("=")
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node[part]
    if last not in node:
        raise SystemExit(f"--set {assignment}: no key '{key}' in params.yaml")
    node[last] = yaml.safe_load(value)


def ours_args(stage: str, out: str, steps: int, batch: int, max_length: int, overrides: list[str]):
    """The stage's own SFTConfig from params.yaml; the bench sets only steps, batch, length, logging, saving."""
    from posttrain.core.config import load_config, read_params
    from stages import cpt, sft

    params = read_params(REPO / "params.yaml")
    for assignment in overrides:
        set_override(params, assignment)
    module, cls = (sft, sft.SFTStageConfig) if stage == "sft" else (cpt, cpt.CPTConfig)
    cfg = load_config(stage, cls, params=params)
    if any(a.startswith(f"{stage}.train.batch_size=") for a in overrides):
        batch = cfg.train.batch_size  # an ablation of the token batch (e.g. --ablate train.batch_size=32)
    train = dataclasses.replace(cfg.train, max_steps=steps, batch_size=batch, max_length=max_length,
                                logging_steps=steps, save_steps=steps * 1000)
    cfg = dataclasses.replace(cfg, train=train)
    args = module.training_args(cfg, out)
    args.report_to = []  # the stage logs to MLflow; its cost is measured by bench/lifecycle_time.py
    return args, cfg


def stock_args(variant: str, out: str, steps: int, batch: int, max_length: int, seed: int):
    import torch
    from trl import SFTConfig

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if STOCK[variant].get("padding_free"):
        max_length = None  # TRL refuses padding_free with a max_length it cannot enforce; the data fits anyway
    return SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=max_length,
                     logging_steps=steps, save_strategy="no", report_to=[], seed=seed, disable_tqdm=True,
                     bf16=gpu_bf16,  # TRL's default is bf16=True, which a CPU-only torch refuses
                     **STOCK[variant])


# ---------------------------------------------------------------- one variant in this process


def worker(a) -> dict:
    import torch
    from trl import SFTTrainer

    shape = weights_shape(a.weights, a.max_length) if a.weights else SHAPES[a.shape]
    dataset = build_dataset(a.stage, a.examples, shape, a.seed)
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        if a.variant.startswith("ours"):  # "ours" or an ablation "ours@train.precision=fp32,sampling=random"
            extra = [f"{a.stage}.{x}" for x in a.variant.partition("@")[2].split(",") if x]
            args, cfg = ours_args(a.stage, out, a.steps, a.batch, shape["max_length"], (a.set or []) + extra)
            settings = {"batch_size": cfg.train.batch_size, "precision": cfg.train.precision,
                        "kernels": "liger" if args.use_liger_kernel else "torch", "compile": cfg.compile,
                        "gradient_checkpointing": cfg.train.gradient_checkpointing,
                        **({"packing": cfg.packing, "sampling": cfg.sampling} if a.stage == "sft" else
                           {"packing": "wrapped"})}
        else:
            args = stock_args(a.variant, out, a.steps, a.batch, shape["max_length"], a.seed)
            settings = STOCK[a.variant]
        model = build_model(shape, a.seed)
        if a.variant.startswith("ours") and a.stage == "sft":  # the stage's attention choice (exact packing)
            from posttrain.model.attention import set_attention

            settings["attention"] = set_attention(model, cfg.attention, cfg.packing)
        n_params = sum(p.numel() for p in model.parameters())
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=build_tokenizer())
        if a.variant.startswith("ours"):  # the stage's LM-head choice for the loss
            from posttrain.model.lm_head import set_loss_head

            settings["loss_head"] = set_loss_head(trainer, cfg.loss_head)
        from posttrain.train.memory.measure import MemoryWindow

        rss_before = rss_mb()
        # resets the peak; holds posttrain.train.plan's estimate for this run. Only the first two steps are profiled, in
        # every variant: profiling later, longer batches would slow random-batch variants more than ours.
        memory = MemoryWindow(trainer, profile_longer_batches=False)
        clock = step_clock(trainer)
        trainer.add_callback(clock)
        if a.profile_dir:  # a few steps after the warm-up, outside the timed figures' interest: read, not compared
            name = f"{a.stage}-{a.variant}".replace("@", "-").replace("=", "-").replace(",", "-")
            from posttrain.train.memory.measure import (
                TENSOR_STEPS,  # the CPU memory window profiles those: one profiler at a time
            )

            first = max(a.warmup_steps, 0 if torch.cuda.is_available() else TENSOR_STEPS)
            trainer.add_callback(step_profiler(first, 3, Path(a.profile_dir) / f"{name}.txt"))
        start = time.perf_counter()
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    from posttrain.core.runtime import peak_memory_mb

    tps = tokens / wall
    steady = steady_tokens_per_s(clock.marks, a.warmup_steps)
    peak = peak_memory_mb()
    mem = memory.metrics()
    result = {"variant": a.variant, "stage": a.stage, "tokens": tokens, "train_wall_s": wall, "tokens_per_s": tps,
              "steady_tokens_per_s": steady, "warmup_steps": a.warmup_steps,
              "step_s": wall / a.steps, "params": n_params, "lm_head_share": lm_head_share(model), "tflops": 6 * n_params * tps / 1e12,
              "peak_memory_mb": peak, "rss_before_train_mb": rss_before, "bf16": bool(args.bf16),
              "train_peak_memory_mb": mem["train_peak_memory_mb"], "plan_estimate_mb": mem["plan_estimate_mb"],
              "early_peak_memory_mb": mem["early_peak_memory_mb"], "plan_parts_mb": memory.plan_parts,
              "tensor_peak_mb": mem["tensor_peak_mb"],
              "settings": settings, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        from trl.trainer.utils import get_peak_flops

        peak_flops = get_peak_flops(torch.cuda.get_device_name(0), "bfloat16" if args.bf16 else "float32")
        result["mfu_pct"] = 100 * 6 * n_params * tps / peak_flops if peak_flops else None
        result["steady_mfu_pct"] = 100 * 6 * n_params * steady / peak_flops if peak_flops and steady else None
    return result


# ---------------------------------------------------------------- the side-by-side run


def variants_for(stage: str, device: str) -> list[str]:
    if stage == "cpt":
        return CPT_VARIANTS
    names = ["trl_default", "trl_packing", "trl_group_by_length", "trl_padding_free"]
    try:
        import liger_kernel  # noqa: F401

        if device == "cuda":
            names.append("trl_liger")
    except ImportError:
        pass
    return names + ["ours"]


def ratio(value: float, base: float) -> str:
    """'2.50x', or 'n/a' where the base did not run (a --variants list without trl_default)."""
    return f"{value / base:.2f}x" if base and not math.isnan(base) else "n/a"


def compare(a) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = a.shape or ("qwen0.5b" if device == "cuda" else "cpu")
    described = weights_shape(a.weights, a.max_length) if a.weights else SHAPES[shape]
    results: dict[str, dict[str, list[dict]]] = {}
    print(f"# throughput: {machine()}; {'weights' if a.weights else 'shape'} {described}; batch {a.batch}, {a.steps} steps, "
          f"{a.repeats} repeats; load before {load()}", flush=True)
    for stage in a.stages:
        names = (a.variants or variants_for(stage, device)) + [f"ours@{x}" for x in a.ablate or []]
        results[stage] = {v: [] for v in names}
        for r in range(a.repeats):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always runs first
            for v in order:
                args = ["--worker", "--stage", stage, "--variant", v, "--shape", shape, "--steps", str(a.steps),
                        "--warmup-steps", str(a.warmup_steps),
                        "--batch", str(a.batch), "--examples", str(a.examples), "--seed", str(a.seed)]
                args += [x for s in a.set or [] for x in ("--set", s)]
                args += ["--weights", a.weights, "--max-length", str(a.max_length)] if a.weights else []
                args += ["--profile-dir", str(Path(a.profile_dir).resolve())] if a.profile_dir else []
                try:
                    res = run_worker("bench.throughput", args, env={"TOKENIZERS_PARALLELISM": "false"},
                                     timeout=a.worker_timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # e.g. out of memory: report, go on
                    print(f"  {stage} {v:22s} repeat {r + 1}: FAILED: {str(e)[-1500:]}", flush=True)
                    continue
                res["load"] = os.getloadavg()[0]
                results[stage][v].append(res)
                if a.json:  # partial results survive a run cut short
                    Path(a.json).write_text(json.dumps({"machine": machine(), "partial": results}, default=str))
                print(f"  {stage} {v:22s} repeat {r + 1}: {res['tokens_per_s']:8.0f} tokens/s "
                      f"(after step {a.warmup_steps}: {res['steady_tokens_per_s'] or 0:.0f}), "
                      f"{res['train_wall_s']:.1f}s, peak {res['train_peak_memory_mb']:.0f} MiB (plan {res['plan_estimate_mb']:.0f}; "
                      f"tensors {res['tensor_peak_mb'] or 0:.0f} vs plan {(res['plan_parts_mb'] or {}).get('tensors', 0):.0f}), "
                      f"load {res['load']:.1f}",
                      flush=True)
    print(f"\nload after {load()}\n")
    summary = {}
    for stage, by_variant in results.items():
        by_variant = {v: runs for v, runs in by_variant.items() if runs}  # a variant that failed every time
        base = median([r["tokens_per_s"] for r in by_variant.get("trl_default", [])])
        stock = {v: median([r["tokens_per_s"] for r in runs]) for v, runs in by_variant.items() if v.startswith("trl")}
        best_stock = max(stock, key=stock.get) if stock else None
        steady_base = median([r["steady_tokens_per_s"] for r in by_variant.get("trl_default", [])
                              if r.get("steady_tokens_per_s")])
        rows = []
        for v, runs in by_variant.items():
            tps = [r["tokens_per_s"] for r in runs]
            mfu = [r["mfu_pct"] for r in runs if r.get("mfu_pct") is not None]
            steady = [r["steady_tokens_per_s"] for r in runs if r.get("steady_tokens_per_s")]
            steady_mfu = [r["steady_mfu_pct"] for r in runs if r.get("steady_mfu_pct") is not None]
            rows.append([v, median(tps), f"{min(tps):,.0f}-{max(tps):,.0f}", ratio(median(tps), base),
                         median(steady) if steady else "n/a",
                         ratio(median(steady), steady_base) if steady else "n/a",
                         f"{median([r['step_s'] for r in runs]):.2f}", f"{median([r['tflops'] for r in runs]):.3f}",
                         f"{median(mfu):.1f}" if mfu else "n/a", f"{median(steady_mfu):.1f}" if steady_mfu else "n/a",
                         median([r["train_peak_memory_mb"] for r in runs]),
                         median([r["plan_estimate_mb"] for r in runs]), "bf16" if runs[0]["bf16"] else "fp32"])
            summary.setdefault(stage, {})[v] = {"tokens_per_s": median(tps), "runs": runs}
        print(f"## {stage}: real tokens/s (median of {a.repeats})\n")
        print(table(["variant", "tokens/s", "range", "vs trl_default", f"after step {a.warmup_steps}",
                     "vs trl_default", "s/step", "TFLOP/s", "MFU %", f"MFU % after step {a.warmup_steps}",
                     "peak MiB", "plan MiB", "precision"], rows))
        first = next(iter(by_variant.values()))[0]
        print(f"\n{first['params'] / 1e6:.1f} M parameters; the LM head is {100 * first['lm_head_share']:.0f} % of a "
              f"token's forward matmul FLOPs")
        if "ours" in by_variant and best_stock:
            ours = median([r["tokens_per_s"] for r in by_variant["ours"]])
            print(f"\nours / trl_default = {ratio(ours, base)}; ours / best stock flag ({best_stock}) = "
                  f"{ours / stock[best_stock]:.2f}x; ours settings: {by_variant['ours'][0]['settings']}\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "shape": shape, "batch": a.batch,
                                            "steps": a.steps, "results": summary}, indent=1, default=str))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="informational; the device is the one torch sees")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: cpu on CPU, qwen0.5b on a GPU)")
    p.add_argument("--weights", help="a pretrained model folder to train as it is (its shape and weights)")
    p.add_argument("--max-length", type=int, default=512, help="with --weights: the longest example")
    p.add_argument("--stages", nargs="+", default=["sft", "cpt"], choices=["sft", "cpt"])
    p.add_argument("--variants", nargs="+", help="subset of the variants (default: all that apply)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, help="steps left out of the steady tokens/s (default: steps // 6, "
                   "at least 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples", type=int, default=2000, help="synthetic training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", help="params.yaml override for 'ours', e.g. sft.train.precision=fp32")
    p.add_argument("--ablate", action="append", help="add a variant: 'ours' with overrides of the stage's section, "
                   "e.g. --ablate train.precision=fp32 (comma-separate several)")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds one variant's process may take; a failed or timed-out run is reported and skipped")
    p.add_argument("--profile-dir", help="write a torch.profiler table of 3 steps after the warm-up, per run, "
                   "here (the profiled steps slow that run's figures)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.warmup_steps is None:
        a.warmup_steps = max(1, a.steps // 6)
    if a.worker:
        print(json.dumps(worker(a)))
        return None
    return compare(a)


if __name__ == "__main__":
    main()
