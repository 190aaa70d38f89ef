"""Which kernels the decoder layers run in sft and cpt: PyTorch's ops ("torch") or Liger's ("liger").

Liger-Kernel fuses RMSNorm, RoPE and SwiGLU into one Triton kernel each, forward and backward. On the H100
our SFT at batch 32 spent about a third of its device time in matrix products and most of the rest in
elementwise ops and casts (bench/results/2026-11-24-h100/run4), which is what those kernels fuse. TRL
applies them through `use_liger_kernel` and keeps its own fused LM head (liger's fused cross-entropy would
replace the model's forward), so `loss_head` still chooses the head. TRL 1.16 marks `use_liger_kernel` as
deprecated in favour of the Hub's kernels, which are downloaded at run time: liger runs offline.

liger-kernel is not a dependency (Triton, GPU only): `pip install -e ".[gpu]"` on a GPU machine.
"""

from __future__ import annotations

import importlib.util

CHOICES = ("auto", "torch", "liger")
# Liger's layer kernels only; TRL refuses its fused_linear_cross_entropy (the LM head is TRL's or ours).
LIGER_LAYERS = {"rms_norm": True, "rope": True, "swiglu": True, "cross_entropy": False,
                "fused_linear_cross_entropy": False}


def liger_problem(device: str | None = None) -> str | None:
    """Why Liger's kernels cannot run on `device` ("cuda" | "cpu"; default: this machine's), None when they can."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        return "Liger's kernels are Triton kernels and need a CUDA GPU (torch.cuda.is_available() is False)"
    missing = [name for name in ("liger_kernel", "triton") if importlib.util.find_spec(name) is None]
    if missing:  # liger-kernel imports Triton when TRL applies it: without either, `auto` must not pick it
        return (f"{' and '.join(missing)} not installed "
                "(pip install -e \".[gpu]\": pyproject.toml's gpu extra pins liger-kernel)")
    return None


def resolve(choice: str, device: str | None = None) -> str:
    """The kernels `choice` means here: auto is liger where it can run (a CUDA GPU with liger-kernel and
    Triton installed), else torch; liger where it cannot run is an error that says why."""
    if choice not in CHOICES:
        raise ValueError(f"kernels must be one of {CHOICES}, got {choice!r}")
    if choice == "auto":
        return "torch" if liger_problem(device) else "liger"
    if choice == "liger" and (problem := liger_problem(device)):
        raise ValueError(f"kernels: liger cannot run here: {problem}. Use kernels: auto (torch without it) or torch.")
    return choice


def trainer_kwargs(kernels: str) -> dict:
    """The SFTConfig fields that select `kernels` (a resolved choice)."""
    if kernels == "liger":
        return {"use_liger_kernel": True, "liger_kernel_config": dict(LIGER_LAYERS)}
    return {}
