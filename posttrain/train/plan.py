"""plan: estimate each training stage's peak memory before it runs, per fine-tuning method, and what fits a budget.

    python -m posttrain.train.plan                          # this machine, every training stage in params.yaml
    python -m posttrain.train.plan --device cuda --budget-gib 24 --stages sft --seq-len 1024

Reads params.yaml (never writes): for each training stage, its model's shape (config.json of a built or
Hugging Face model, or `base.tiny` before the base stage has run), precision, batch size, max_length and
adapter settings. For every method (full, freeze, lora, qlora, dora, ia3, prompt/prefix/p-tuning,
bottleneck) it prints the parts of posttrain.train.memory.estimate and the largest batch that fits `--budget-gib`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain.core.stages_registry import names
from posttrain.train.memory.estimate import METHODS, AdapterShape, Shape, estimate, max_batch, shape_of

TRAINING_STAGES = names(trains=True)

def stage_model_shape(stage: str, params: dict) -> tuple[Shape, str]:
    """(shape, where it came from) of the model `stage` trains, built or not yet built."""
    section = params[stage]
    if stage == "distill":
        student = section["student"]
        teacher, _ = _shape_at(section["teacher"], params)
        if student["source"] == "tiny":
            return _tiny_shape(student["tiny"], teacher.vocab), "distill.student.tiny"
        return _shape_at(student["source"], params)
    return _shape_at(section["model"], params)


def stage_model_shape_teacher(params: dict) -> Shape:
    return _shape_at(params["distill"]["teacher"], params)[0]


def _shape_at(path: str, params: dict) -> tuple[Shape, str]:
    from posttrain.model.loading import is_adapter_dir, local_path

    local = Path(local_path(path))
    while local.exists() and is_adapter_dir(local):
        base = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"]
        local = Path(local_path(base)) if Path(local_path(base)).exists() else (local / base).resolve()
    if (local / "config.json").exists():
        from transformers import AutoConfig

        return shape_of(AutoConfig.from_pretrained(local)), str(path)
    if path.startswith("models/"):  # not built yet: every stage descends from base
        base = params["base"]
        if base["source"] == "tiny":
            return _tiny_shape(base["tiny"], base["tokenizer"]["vocab_size"]), "base.tiny (not built yet)"
        return _shape_at(base["source"], params)
    from transformers import AutoConfig

    try:
        return shape_of(AutoConfig.from_pretrained(path)), path
    except OSError as e:
        raise SystemExit(f"plan: cannot read the config of {path!r} ({e}); build it or set HF_HUB_OFFLINE=0")


def _tiny_shape(tiny: dict, vocab: int) -> Shape:
    return Shape(vocab=vocab, hidden=tiny["hidden_size"], layers=tiny["num_layers"], heads=tiny["num_heads"],
                 kv_heads=tiny["num_kv_heads"], head_dim=tiny["hidden_size"] // tiny["num_heads"],
                 intermediate=tiny["intermediate_size"], tied=tiny["tie_word_embeddings"])


def stage_kind(stage: str, section: dict) -> str:
    if stage in ("reward", "judge"):
        return "reward"
    if stage == "align":
        return {"dpo": "pairs", "orpo": "pairs", "kto": "sft"}.get(section["method"], "online")
    return "sft"


def resolve_for(device: str, precision: str) -> str:
    """precision as the stage would resolve it on `device` (auto: bf16 where it is native)."""
    from posttrain.core.runtime import cpu_has_bf16

    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" or cpu_has_bf16() else "fp32"


def plan(params: dict, device: str, budget_gib: float, stages: list[str], seq_len: int | None,
         batch: int | None) -> list[dict]:
    from posttrain.core.config import AdapterConfig, TrainConfig, build, stage_section
    from posttrain.model.lm_head import resolve as resolve_loss_head

    rows = []
    for stage in stages:
        section = stage_section(params, stage)
        shape, source = stage_model_shape(stage, params)
        train = build(TrainConfig, section["train"], f"{stage}.train")
        adapter = build(AdapterConfig, section["adapter"], f"{stage}.adapter") if "adapter" in section else None
        precision = resolve_for(device, train.precision)
        seq = seq_len or train.max_length
        kind = stage_kind(stage, section)
        b = batch or train.batch_size
        methods = METHODS if adapter else ("full",)
        adapter = adapter or AdapterShape(freeze_train_top_k=shape.layers, num_virtual_tokens=0)
        for method in methods:
            if method == "qlora" and device != "cuda":
                continue
            ref = shape.params() if kind in ("pairs", "online") and method in ("full", "freeze") else 0
            if stage == "distill" and section.get("method") == "logits":  # the teacher stays in memory
                ref = stage_model_shape_teacher(params).params()
            kw = dict(method=method, adapter=adapter, precision=precision, seq_len=seq, device=device, kind=kind,
                      gradient_checkpointing=train.gradient_checkpointing, extra_frozen_params=ref,
                      grad_accum=train.grad_accum,
                      packed=stage == "cpt" or bool(section.get("packing")),
                      loss_head=resolve_loss_head(section.get("loss_head", "fused"), device))
            est = estimate(shape, batch=b, **kw)
            rows.append({"stage": stage, "model": source, "params": shape.params(), "method": method,
                         "configured": method == getattr(adapter, "method", "full"), "precision": precision,
                         "batch": b, "seq_len": seq, **est, "fits": est["total"] <= budget_gib * 1024,
                         "max_batch": max_batch(shape, budget_gib * 1024, **kw),
                         "max_batch_ckpt": max_batch(shape, budget_gib * 1024,
                                                     **{**kw, "gradient_checkpointing": True})})
    return rows


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f}" if mib >= 1024 else f"{mib / 1024:.3f}"


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from posttrain.core.config import read_params

    parser = argparse.ArgumentParser(prog="python -m posttrain.train.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="plan for this device (default: this machine's)")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="memory budget (default 24 GiB)")
    parser.add_argument("--stages", nargs="+", choices=TRAINING_STAGES, help="default: every training stage present")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: each stage's train.max_length)")
    parser.add_argument("--batch", type=int, help="batch size (default: each stage's train.batch_size)")
    parser.add_argument("--json", help="also write the rows here")
    a = parser.parse_args(argv)
    params = read_params(a.params)
    stages = a.stages or [s for s in TRAINING_STAGES if s in params]
    rows = plan(params, a.device, a.budget_gib, stages, a.seq_len, a.batch)
    print(f"# memory plan: device {a.device}, budget {a.budget_gib:g} GiB (estimates in GiB; * = the configured method)")
    for stage in stages:
        srows = [r for r in rows if r["stage"] == stage]
        if not srows:
            continue
        r0 = srows[0]
        print(f"\n## {stage}: {r0['model']}, {r0['params'] / 1e6:.1f} M params, {r0['precision']}, "
              f"batch {r0['batch']} x {r0['seq_len']} tokens\n")
        print("| method | trainable | weights | grads | optimizer | activations | lm head | runtime | total | fits | "
              "max batch | max batch (grad ckpt) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in srows:
            print(f"| {r['method']}{' *' if r['configured'] else ''} | {r['trainable_params'] / 1e6:.2f} M | "
                  + " | ".join(_gib(r[k]) for k in ("weights", "grads", "optimizer", "activations", "lm_head",
                                                      "runtime", "total"))
                  + f" | {'yes' if r['fits'] else 'no'} | {r['max_batch']} | {r['max_batch_ckpt']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
