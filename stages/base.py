"""base: materialise the starting model.

`source: tiny` (the embedded default) trains a byte-level BPE tokenizer on the prepared text and
builds a small Llama-architecture model from `base.tiny`; any other `source` is a Hugging Face id or
local path, loaded offline-safe as safetensors (trust_remote_code only when set). Either way the
result is a plain Hugging Face folder with a chat template, so every later stage loads it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.cli import run_stage
from posttrain.config import TrackingConfig
from posttrain.files import atomic_dir, write_json
from posttrain.runtime import set_seed
from posttrain.tiny import CHAT_TEMPLATE, TinyModelConfig, TokenizerConfig, build_tiny_model, train_tokenizer
from posttrain.tracking import log_model_dir, log_stage_metrics, stage_run


@dataclass(frozen=True)
class BaseConfig:
    seed: int
    tracking: TrackingConfig
    source: str  # "tiny", a Hugging Face id or a local path
    trust_remote_code: bool
    tokenizer: TokenizerConfig
    tiny: TinyModelConfig
    out_dir: str


def load_pretrained(cfg: BaseConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.source, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.source, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def run(cfg: BaseConfig) -> dict:
    set_seed(cfg.seed)
    with stage_run("base", cfg, inputs={Path(f).stem: f for f in cfg.tokenizer.train_files} if cfg.source == "tiny" else {}):
        if cfg.source == "tiny":
            tokenizer = train_tokenizer(cfg.tokenizer)
            model = build_tiny_model(cfg.tiny, tokenizer)
        else:
            model, tokenizer = load_pretrained(cfg)
        with atomic_dir(cfg.out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        metrics = {"params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
        log_stage_metrics(metrics)
        log_model_dir(cfg.out_dir, cfg)
    write_json("metrics/base.json", metrics)
    return metrics


if __name__ == "__main__":
    run_stage("base", BaseConfig, run)
