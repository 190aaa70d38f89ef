"""base: materialise the starting model.

`source: tiny` (the embedded default) trains a byte-level BPE tokenizer on the prepared text and
builds a small Llama-architecture model from `base.tiny`; a `.gguf` file (a path, or
`pkg:<package>/<file>.gguf` inside an installed package) is dequantized once (posttrain.model.from_gguf); any
other `source` is a Hugging Face id or local path, loaded offline-safe as safetensors (trust_remote_code
only when set). Either way the result is a plain Hugging Face folder with a chat template and a
generation config that stops at the tokenizer's eos, so every later stage loads it the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from posttrain.core.cli import run_stage
from posttrain.core.config import ConfigError, TrackingConfig
from posttrain.core.files import atomic_dir, check_model_folder, digest, missing_input, write_json
from posttrain.core.runtime import set_seed
from posttrain.core.tracking import log_model_dir, log_stage_metrics, stage_run
from posttrain.model.from_gguf import is_gguf_source, load_gguf, resolve
from posttrain.model.tiny import CHAT_TEMPLATE, TinyModelConfig, TokenizerConfig, build_tiny_model, train_tokenizer


@dataclass(frozen=True)
class BaseConfig:
    seed: int
    tracking: TrackingConfig
    source: str  # "tiny", a Hugging Face id, a local path, or a .gguf file (path or pkg:<package>/<file>.gguf)
    trust_remote_code: bool
    tokenizer: TokenizerConfig
    tiny: TinyModelConfig
    out_dir: str


KEY = "base.source"
SOURCES = ("`tiny`, a model folder (config.json, *.safetensors, tokenizer), a Hugging Face id, "
           "or a .gguf file (a path or pkg:<package>/<file>.gguf)")


def check_source(source: str) -> None:
    """A ConfigError naming base.source unless `source` (a local path or hub id) can be loaded: checked before
    anything is written, so a missing folder, one without weights or tokenizer, or a damaged safetensors file
    stops the stage with what to do instead of a loader's traceback."""
    path = Path(source).expanduser()
    if path.is_file():
        raise ConfigError(f"[{KEY}] {source}: a file; expected {SOURCES}")
    if path.is_dir():
        check_model_folder(path, KEY)
        return
    if _looks_local(source) or not _valid_repo_id(source):
        raise ConfigError(f"[{KEY}] {source}: no such folder; expected {SOURCES}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "no", ""):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise ConfigError(f"[{KEY}] {source}: no such folder, and no Hugging Face model of that id in the local "
                              f"cache (downloads are off: HF_HUB_OFFLINE=1); give a local folder, or run with "
                              f"HF_HUB_OFFLINE=0 to download it")


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def _valid_repo_id(source: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def load_pretrained(cfg: BaseConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.source, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.source, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as e:  # what the checks cannot see: an unknown architecture, a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"[{KEY}] {cfg.source}: cannot be loaded ({first}); expected {SOURCES}") from e
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
        for f in cfg.tokenizer.train_files:  # likewise the data the tokenizer is trained on (prepare makes it)
            if not Path(f).is_file():
                raise missing_input(f, "base.tokenizer.train_files")
        inputs = {Path(f).stem: f for f in cfg.tokenizer.train_files}
    elif not gguf:
        check_source(cfg.source)
        inputs = {}
    else:
        inputs = {"gguf": gguf}
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
