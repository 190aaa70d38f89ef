"""Typed configuration built from params.yaml.

Each stage declares a frozen dataclass for its section; `load_config("sft", SFTConfig)` reads that
section and fails at once, naming the stage and the key, on an unknown, missing or ill-typed key.
Top-level keys (`seed`, `tracking`) reach a stage when its dataclass declares a field of that name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
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
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader where built: ~20x faster
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
    # where the trainers log their curves (train and eval loss): mlflow, tensorboard (event files under runs/<stage>/)
    report_to: list[Literal["mlflow", "tensorboard"]] = dataclasses.field(default_factory=lambda: ["mlflow"])


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
    eval_steps: int  # held-out loss every eval_steps steps (eval_loss curves) where a stage has a held-out set; 0 off
    num_threads: int  # torch CPU threads; 0 = torch's default


@dataclass(frozen=True)
class AdapterConfig:
    """How much of the model a fine-tuning stage trains (`method`) and the PEFT settings."""

    method: Literal[
        "full", "freeze", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck"
    ]
    freeze_train_top_k: int  # method=freeze: train only the top k decoder layers (+ final norm)
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    num_virtual_tokens: int  # prompt_tuning / prefix_tuning / p_tuning
    # bottleneck (posttrain.model.bottleneck): down to hidden // reduction_factor, nonlinearity, up (zero-initialised)
    reduction_factor: int = 16
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"  # houlsby: after attention and MLP; pfeiffer: MLP only
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"


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
    """A YAML file's top-level mapping; any way it cannot be one is a ConfigError naming the file (and line)."""
    if not path.exists():
        raise ConfigError(f"{path}: no such {what}")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected the {what} (a YAML file)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror or e})")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is valid UTF-8
    except UnicodeDecodeError as e:
        start = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        raise ConfigError(f"{path} {_line_of(raw, start)}: not UTF-8 text (byte {raw[start]:#04x}); "
                          f"save the {what} as UTF-8")
    try:
        data = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_yaml_place(e)}: malformed YAML ({_yaml_problem(e)}); fix the {what}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _line_of(data: bytes, offset: int) -> str:
    return "line %d" % (data[:offset].count(b"\n") + 1)


def _yaml_place(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: Exception) -> str:
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return ", ".join(p for p in parts if p) or str(e).splitlines()[0]


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
    if not isinstance(shared, dict) or any(not isinstance(v, dict) for v in shared.values()):
        raise ConfigError(f"[{DEFAULTS_KEY}] expected a mapping of blocks ({', '.join(SHARED_BLOCKS)}), each a mapping")
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
    values = {name: _coerce(hints[name], data[name], f"{where}.{name}") for name in fields if name in data}
    for name, value in values.items():
        check_range(name, value, f"{where}.{name}")
    return cls(**values)


# ---------------------------------------------------------------- value ranges, by field name
# One table for every stage's config (a field's name says what it is, whichever dataclass declares it), so a value
# outside its domain stops the stage at load, naming the key, before anything is read or written.

AT_LEAST_1 = "at least 1"
NON_NEGATIVE = ">= 0"
POSITIVE = "> 0"
UNIT = "in [0, 1]"
RANGES: dict[str, str] = {
    **dict.fromkeys(("learning_rate", "temperature"), POSITIVE),
    **dict.fromkeys((
        "max_steps", "batch_size", "eval_batch_size", "gen_batch_size", "grad_accum", "max_length", "max_new_tokens",
        "max_completion_length", "reward_max_length", "logging_steps", "save_steps", "lora_r", "lora_alpha",
        "num_virtual_tokens", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "intermediate_size",
        "max_position_embeddings", "vocab_size", "num_generations", "num_samples", "block_size", "speed_rounds",
        "ngram", "min_tokens", "max_chars"), AT_LEAST_1),
    **dict.fromkeys((
        "seed", "weight_decay", "num_threads", "max_prompts", "max_eval", "max_per_suite", "max_eval_per_suite",
        "freeze_train_top_k", "num_processes", "num_fewshot", "samples_per_suite", "speed_prompts", "check_new_tokens",
        "min_reward_gap", "sft_weight", "replay", "verifiable_reward_weight", "center_rewards_coefficient", "beta",
        "main_process_port", "eval_steps"), NON_NEGATIVE),
    **dict.fromkeys(("lora_dropout", "top_p"), UNIT),
}
UNIT_SUFFIXES = ("_share", "_fraction", "_ratio", "_prob", "_probability")  # shares and probabilities
COUNT_PREFIX = "n_"  # sample.n_corpus_docs, ...: counts


def rule_for(name: str) -> str | None:
    if name in RANGES:
        return RANGES[name]
    if name.endswith(UNIT_SUFFIXES) or name == "probability":
        return UNIT
    if name.startswith(COUNT_PREFIX):
        return NON_NEGATIVE
    return None


def check_range(name: str, value: Any, where: str) -> None:
    """ConfigError naming `where` when a number is not finite or lies outside the domain its field name implies."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"[{where}] must be a finite number, got {value}; set a number in params.yaml")
    rule = rule_for(name)
    ok = {None: True, POSITIVE: value > 0, AT_LEAST_1: value >= 1, NON_NEGATIVE: value >= 0,
          UNIT: 0 <= value <= 1}[rule]
    if not ok:
        raise ConfigError(f"[{where}] must be {rule}, got {value}; fix it in params.yaml (or the profile)")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # `1e-3`: a float in YAML 1.2, a string to PyYAML


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
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"[{where}] expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value
