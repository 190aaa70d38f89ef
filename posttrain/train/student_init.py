"""The distillation student: a tiny model built from config with the teacher's tokenizer (optionally started
from the teacher's embeddings, final norm and evenly spaced layers, its MLPs pruned to the widest neurons), or
any Hugging Face id / local path that fits the distillation method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.core.runtime import set_seed
from posttrain.model.loading import load_model, load_tokenizer
from posttrain.model.tiny import TinyModelConfig, build_tiny_model
from posttrain.train.distillation import DistillError


@dataclass(frozen=True)
class StudentConfig:
    source: str  # "tiny": build from `tiny` with the teacher's tokenizer; else a Hugging Face id or local path
    init: Literal["random", "teacher"]  # tiny only: teacher = copy embeddings, final norm, evenly spaced layers
    tiny: TinyModelConfig


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def build_student(cfg, teacher, teacher_tok):
    """(student model, its tokenizer): tiny from config with the teacher's tokenizer, or loaded from source.
    `cfg` is the distill config (student, seed, method, teacher)."""
    if cfg.student.source == "tiny":
        set_seed(cfg.seed)
        like = teacher.config if cfg.student.init == "teacher" else None
        student = build_tiny_model(cfg.student.tiny, teacher_tok, like=like)
        if student.config.vocab_size != teacher.config.vocab_size:  # a teacher with padded embeddings
            student.resize_token_embeddings(teacher.config.vocab_size)
        if cfg.student.init == "teacher":
            init_from_teacher(student, teacher)
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


def init_from_teacher(student, teacher) -> None:
    """Copy the teacher's embeddings, final norm and evenly spaced layers into the student.

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
        picks = [round(i * (n_t - 1) / max(n_s - 1, 1)) for i in range(n_s)]
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
