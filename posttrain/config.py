"""Typed configuration built from params.yaml.

Each stage declares a frozen dataclass for its section; `load_config("sft", SFTConfig)` reads that
section and fails at once, naming the stage and the key, on an unknown, missing or ill-typed key.
Top-level keys (`seed`, `tracking`) reach a stage when its dataclass declares a field of that name.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

# Nothing downloads at run time: models and data come from this repo or local paths. Every stage and tool
# reads its config first, so this is set before transformers loads. HF_HUB_OFFLINE=0 lets a stage fetch a hub id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A run's output is progress and results. The memory measurement profiles a few steps on CPU; without these,
# torch's profiler prints `USDT: ... profiler_start` lines and c10's allocator a warning per profiled window.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above kineto's USDT level (read when profiling starts)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # read when torch loads: stages import this module first

PARAMS_FILE = "params.yaml"
GLOBAL_KEYS = ("seed", "tracking")
DEFAULTS_KEY = "defaults"  # shared blocks, merged under each stage's own (stage_section)
SHARED_BLOCKS = ("adapter", "train", "decode")
PROFILE_KEY, PROFILES_DIR = "profile", "profiles"  # params.yaml `profile: <name>` lays profiles/<name>.yaml over it


class StageError(ValueError):
    """A stage cannot run as configured or on the data it was given. Nothing was written.

    `python -m stages.<name>` prints `<label>: <message>` and exits 1 instead of a traceback.
    """

    label = "error"


class ConfigError(StageError):
    """A params.yaml value is missing, unknown or of the wrong type."""

    label = "config error"


@dataclass(frozen=True)
class TrackingConfig:
    uri: str  # empty: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db
    experiment: str
    log_models: bool  # copy each stage's model or adapter into its MLflow run


@dataclass(frozen=True)
class TrainConfig:
    """What every training stage passes to its TRL/transformers trainer."""

    max_steps: int
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    batch_size: int
    grad_accum: int
    max_length: int
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    gradient_checkpointing: bool
    logging_steps: int
    save_steps: int  # checkpoint period; a killed stage resumes from the last one
    num_threads: int  # torch CPU threads; 0 = torch's default


@dataclass(frozen=True)
class AdapterConfig:
    """How much of the model a fine-tuning stage trains (`method`) and the PEFT settings."""

    method: Literal[
        "full", "freeze", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"
    ]
    freeze_train_top_k: int  # method=freeze: train only the top k decoder layers (+ final norm)
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    num_virtual_tokens: int  # prompt_tuning / prefix_tuning / p_tuning


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml with its profile laid over it: `profile: real` reads profiles/real.yaml (next to the params
    file) and its values win, section by section and key by key; `profile: default` changes nothing."""
    path = Path(path)
    params = _read_mapping(path, "params file")
    name = params.get(PROFILE_KEY, "default")
    if name == "default":  # profiles/default.yaml is empty: it exists for dvc.yaml's `profiles/${profile}.yaml` dep
        return params
    profile_file = path.parent / PROFILES_DIR / f"{name}.yaml"
    if not isinstance(name, str) or not profile_file.is_file():
        known = sorted(p.stem for p in (path.parent / PROFILES_DIR).glob("*.yaml"))
        raise ConfigError(f"[{PROFILE_KEY}] {name!r}: no file {profile_file} (profiles: {', '.join(known)})")
    overlay = _read_mapping(profile_file, "profile")
    if PROFILE_KEY in overlay:
        raise ConfigError(f"{profile_file}: a profile cannot set '{PROFILE_KEY}'")
    return overlaid(params, overlay)


def _read_mapping(path: Path, what: str) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: no such {what}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def overlaid(base: dict, over: dict) -> dict:
    """`over` laid on `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = overlaid(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def stage_section(params: dict, stage: str, path: str | Path = PARAMS_FILE) -> dict:
    """The `stage` section of params.yaml with the shared blocks of `defaults` under it.

    params.yaml `defaults` holds the `adapter`, `train` and `decode` blocks once; a stage's own block
    keys win over them. Only blocks the stage writes (even as `{}`) are merged: `train: {}` reads as the
    defaults alone, a stage without `train` gets none.
    """
    if stage not in params:
        raise ConfigError(f"[{stage}] section missing from {path}")
    section = params[stage]
    if not isinstance(section, dict):
        raise ConfigError(f"[{stage}] expected a mapping, got {type(section).__name__}")
    data = dict(section)
    shared = params.get(DEFAULTS_KEY) or {}
    unknown = sorted(set(shared) - set(SHARED_BLOCKS))
    if unknown:
        raise ConfigError(f"[{DEFAULTS_KEY}] unknown block(s): {', '.join(unknown)} "
                          f"(known: {', '.join(SHARED_BLOCKS)})")
    for block, defaults in shared.items():
        if block in data:
            own = data[block] or {}
            if not isinstance(own, dict):
                raise ConfigError(f"[{stage}.{block}] expected a mapping, got {own!r}")
            data[block] = {**defaults, **own}
    return data


def load_config(stage: str, cls: type, path: str | Path = PARAMS_FILE, params: dict | None = None):
    """Build `cls` from the `stage` section of params.yaml (plus any declared top-level keys)."""
    params = read_params(path) if params is None else params
    data = stage_section(params, stage, path)
    for key in GLOBAL_KEYS:
        if key in {f.name for f in dataclasses.fields(cls)}:
            if key in data:
                raise ConfigError(f"[{stage}] '{key}' is a top-level key; remove it from the section")
            if key not in params:
                raise ConfigError(f"[{stage}] missing top-level key '{key}'")
            data[key] = params[key]
    return build(cls, data, stage)


def build(cls: type, data: Any, where: str):
    """Recursively turn a mapping into dataclass `cls`, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"[{where}] unknown key(s): {', '.join(unknown)} (known: {', '.join(fields)})")
    # A field with a dataclass default may be left out (e.g. a source's optional `columns` mapping); every other
    # key must be written, so params.yaml stays the one place values are set.
    missing = [name for name, f in fields.items() if name not in data and not _has_default(f)]
    if missing:
        raise ConfigError(f"[{where}] missing key(s): {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], data[name], f"{where}.{name}") for name in fields if name in data})


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _coerce(tp: Any, value: Any, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"[{where}] must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"[{where}] expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"[{where}] expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"[{where}] expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value
