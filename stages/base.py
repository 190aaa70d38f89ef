"""base: materialise the starting model.

`source: tiny` (the embedded default) trains a byte-level BPE tokenizer on the prepared text and
builds a small Llama-architecture model from `base.tiny`; a `.gguf` file (a path, or
`pkg:<package>/<file>.gguf` inside an installed package) is dequantized once (posttrain.from_gguf); any
other `source` is a Hugging Face id or local path, loaded offline-safe as safetensors (trust_remote_code
only when set). Either way the result is a plain Hugging Face folder with a chat template and a
generation config that stops at the tokenizer's eos, so every later stage loads it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.cli import run_stage
from posttrain.config import TrackingConfig
from posttrain.files import atomic_dir, digest, write_json
from posttrain.from_gguf import is_gguf_source, load_gguf, resolve
from posttrain.runtime import set_seed
from posttrain.tiny import CHAT_TEMPLATE, TinyModelConfig, TokenizerConfig, build_tiny_model, train_tokenizer
from posttrain.tracking import log_model_dir, log_stage_metrics, stage_run


@dataclass(frozen=True)
class BaseConfig:
    seed: int
    tracking: TrackingConfig
    source: str  # "tiny", a Hugging Face id, a local path, or a .gguf file (path or pkg:<package>/<file>.gguf)
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
    return chat_ready(model, tokenizer)


def chat_ready(model, tokenizer):
    """What every later stage expects of a loaded tokenizer: a pad token and a chat template."""
    # pad may equal eos (SmolLM2's does): the stages mask by attention and label position, not by pad id.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def stop_at_eos(model, tokenizer) -> None:
    """A GGUF file carries no generation config: greedy, ending at the tokenizer's eos (SmolLM2: <|im_end|>)."""
    from transformers import GenerationConfig

    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )


def run(cfg: BaseConfig) -> dict:
    set_seed(cfg.seed)
    gguf = resolve(cfg.source) if is_gguf_source(cfg.source) else None  # a missing file stops before any output
    if cfg.source == "tiny":
        inputs = {Path(f).stem: f for f in cfg.tokenizer.train_files}
    else:
        inputs = {"gguf": gguf} if gguf else {}
    with stage_run("base", cfg, inputs=inputs):
        if cfg.source == "tiny":
            tokenizer = train_tokenizer(cfg.tokenizer)
            model = build_tiny_model(cfg.tiny, tokenizer)
        elif gguf:
            model, tokenizer = chat_ready(*load_gguf(gguf))
            stop_at_eos(model, tokenizer)
        else:
            model, tokenizer = load_pretrained(cfg)
        with atomic_dir(cfg.out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        metrics = {"params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
        if gguf:  # provenance: which file the weights were dequantized from
            metrics.update(gguf_file=gguf.name, gguf_sha256=digest(gguf))
        log_stage_metrics(metrics)
        log_model_dir(cfg.out_dir, cfg)
    write_json("metrics/base.json", metrics)
    return metrics


if __name__ == "__main__":
    run_stage("base", BaseConfig, run)
