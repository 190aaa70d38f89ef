"""The distillation student: a tiny model built from config with the teacher's tokenizer (optionally started
from the teacher's embeddings, final norm and a subset of its layers, its MLPs pruned to the widest neurons), or
any Hugging Face id / local path that fits the distillation method.

Which layers: `evenly` spaced, or by `block_influence` (ShortGPT, Men et al. 2024): keep the layers that change
the residual stream most on calibration text. Measured on SmolLM2-135M (30 layers; corpus perplexity before any
training, teacher 27.8): keeping 24 layers evenly 113.9 vs by influence 48.6; 20 layers 17,571 vs 106.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.core.runtime import set_seed
from posttrain.model.loading import load_model, load_tokenizer
from posttrain.model.tiny import TinyModelConfig, build_tiny_model
from posttrain.train.distillation import DistillError

CALIBRATION_TEXTS = 32  # block_influence: prompts the teacher's layers are measured on (ShortGPT uses a few dozen)


@dataclass(frozen=True)
class StudentConfig:
    source: str  # "tiny": build from `tiny` with the teacher's tokenizer; else a Hugging Face id or local path
    init: Literal["random", "teacher"]  # tiny only: teacher = copy embeddings, final norm, a subset of its layers
    layers: Literal["evenly", "block_influence"]  # init teacher: which of the teacher's layers the student keeps
    tiny: TinyModelConfig


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def build_student(cfg, teacher, teacher_tok, calibration: list[str] = ()):
    """(student model, its tokenizer): tiny from config with the teacher's tokenizer, or loaded from source.
    `cfg` is the distill config (student, seed, method, teacher); `calibration`: texts that block_influence
    measures the teacher's layers on."""
    if cfg.student.source == "tiny":
        set_seed(cfg.seed)
        like = teacher.config if cfg.student.init == "teacher" else None
        student = build_tiny_model(cfg.student.tiny, teacher_tok, like=like)
        if student.config.vocab_size != teacher.config.vocab_size:  # a teacher with padded embeddings
            student.resize_token_embeddings(teacher.config.vocab_size)
        if cfg.student.init == "teacher":
            picks = None
            if cfg.student.layers == "block_influence":
                if not calibration:
                    raise DistillError("student.layers=block_influence needs calibration prompts; none were given")
                influence = block_influence(teacher, teacher_tok, list(calibration))
                most = sorted(range(len(influence)), key=lambda i: -influence[i])
                picks = sorted(most[: student.config.num_hidden_layers])
            init_from_teacher(student, teacher, picks)
        return student, teacher_tok
    tok = load_tokenizer(cfg.student.source)
    if cfg.method == "logits" and not same_tokenizer(tok, teacher_tok):
        raise DistillError(
            f"distill.method=logits needs the student to share the teacher's tokenizer: {cfg.student.source} "
            f"({len(tok)} tokens) differs from {cfg.teacher} ({len(teacher_tok)} tokens). "
            "Use method: sequence, or a student with the teacher's tokenizer."
        )
    if tok.chat_template is None:
        raise DistillError(f"student {cfg.student.source}: its tokenizer has no chat template")
    return load_model(cfg.student.source), tok


def block_influence(model, tokenizer, texts: list[str], max_length: int = 128) -> list[float]:
    """Each decoder layer's Block Influence: 1 - the mean cosine similarity of its input and output hidden states
    over the texts' tokens. A layer near 0 barely changes the residual stream: the first to drop."""
    sims: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    mask = enc["attention_mask"].bool()

    def hook(i):
        def record(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            sims[i].append(torch.nn.functional.cosine_similarity(inp[mask], out[mask], dim=-1).mean())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(**enc.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return [1.0 - float(s[0]) for s in sims]


def init_from_teacher(student, teacher, picks: list[int] | None = None) -> None:
    """Copy the teacher's embeddings, final norm and layers `picks` (default: evenly spaced) into the student.

    Hidden size and heads must match; a narrower MLP keeps the teacher's neurons with the largest
    gate*up*down weight norms (structured pruning).
    """
    s_cfg, t_cfg = student.config, teacher.config
    for attr in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if getattr(s_cfg, attr) != getattr(t_cfg, attr):
            raise DistillError(f"student.init=teacher needs the teacher's {attr} "
                               f"({getattr(t_cfg, attr)}), got {getattr(s_cfg, attr)}; use init: random")
    if s_cfg.intermediate_size > t_cfg.intermediate_size or s_cfg.num_hidden_layers > t_cfg.num_hidden_layers:
        raise DistillError("student.init=teacher: the student must not be wider or deeper than the teacher")
    sm, tm = student.model, teacher.model
    with torch.no_grad():
        sm.embed_tokens.weight.copy_(tm.embed_tokens.weight)
        sm.norm.weight.copy_(tm.norm.weight)
        if not s_cfg.tie_word_embeddings:
            student.lm_head.weight.copy_(teacher.get_output_embeddings().weight)
        n_s, n_t = len(sm.layers), len(tm.layers)
        picks = picks or [round(i * (n_t - 1) / max(n_s - 1, 1)) for i in range(n_s)]
        if len(picks) != n_s or not all(0 <= t < n_t for t in picks):
            raise DistillError(f"student.init=teacher: layer picks {picks} do not fit {n_s} of {n_t} layers")
        for s_layer, t in zip(sm.layers, picks):
            t_layer = tm.layers[t]
            s_layer.self_attn.load_state_dict(t_layer.self_attn.state_dict())
            s_layer.input_layernorm.load_state_dict(t_layer.input_layernorm.state_dict())
            s_layer.post_attention_layernorm.load_state_dict(t_layer.post_attention_layernorm.state_dict())
            g, u, d = t_layer.mlp.gate_proj.weight, t_layer.mlp.up_proj.weight, t_layer.mlp.down_proj.weight
            keep = (g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)).topk(s_cfg.intermediate_size).indices.sort().values
            s_layer.mlp.gate_proj.weight.copy_(g[keep])
            s_layer.mlp.up_proj.weight.copy_(u[keep])
            s_layer.mlp.down_proj.weight.copy_(d[:, keep])
