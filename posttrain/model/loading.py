"""Loading, adapting and saving models: the one place that knows about PEFT adapters.

A stage's output folder holds either a full model (safetensors) or only a PEFT adapter whose
`base_model_name_or_path` points at the folder it was trained on. `load_model` follows that chain
(models/sft -> models/cpt -> models/base), merging LoRA-family adapters on the way, so any stage can
load any earlier stage's result without keeping a second full copy on disk. A bottleneck adapter
(posttrain.model.bottleneck, our own module in the same folder layout) is attached, never merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from posttrain.core.config import AdapterConfig, StageError
from posttrain.core.files import missing_input, producer
from posttrain.model import bottleneck

PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")


PASSTHROUGH = "passthrough.json"  # the output of a switched-off stage: it names the model it passes on


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(local_path(str(path))) / "adapter_config.json").exists()


def local_path(path: str) -> str:
    """An existing local path made absolute (so transformers never mistakes it for a hub id); a switched-off
    stage's folder (`enabled: false`) is followed to the model it passes on."""
    p = Path(path)
    target = passed_on(p)
    if target is not None:
        return local_path(target)
    return str(p.resolve()) if not p.is_absolute() and p.exists() else path


def passed_on(folder: str | Path) -> str | None:
    """The model a switched-off stage's folder passes on (a path relative to it, or a hub id), else None."""
    pointer = Path(folder) / PASSTHROUGH
    if not pointer.is_file():
        return None
    model = json.loads(pointer.read_text())["model"]
    if model is None:
        return None
    local = Path(folder) / model
    return str(local.resolve()) if not Path(model).is_absolute() and local.exists() else model


def write_passthrough(out_dir: str | Path, model: str | None, stage: str) -> None:
    """Make `out_dir` name `model` (None: the stage has no model to pass on) instead of holding weights."""
    local = model is not None and Path(model).exists()
    target = os.path.relpath(Path(model).resolve(), Path(out_dir).resolve()) if local else model
    (Path(out_dir) / PASSTHROUGH).write_text(json.dumps({"model": target, "skipped_stage": stage}) + "\n")


def is_passthrough(folder: str | Path) -> bool:
    return (Path(folder) / PASSTHROUGH).is_file()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_existing(local_path(str(path))))


def load_model(path: str | Path, merge: bool = True, trust_remote_code: bool = False, dtype=torch.float32):
    """Load a stage's model by local path or Hugging Face id; adapters are applied (and merged)."""
    from transformers import AutoModelForCausalLM

    path = _existing(local_path(str(path)))
    if not is_adapter_dir(path):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    from peft import PeftModel

    base_path = base_of_adapter(path)
    base = load_model(base_path, merge=True, trust_remote_code=trust_remote_code, dtype=dtype)
    if bottleneck.is_bottleneck_dir(path):  # not mergeable: it stays as a frozen module (posttrain.model.bottleneck)
        if hasattr(base, "peft_config"):
            raise RuntimeError(f"{path}: a bottleneck adapter over a prompt-learning adapter is not supported")
        return bottleneck.load(base, path)
    model = PeftModel.from_pretrained(base, path)
    if merge and not model.peft_config["default"].is_prompt_learning:
        return model.merge_and_unload()
    return model


def _existing(path: str) -> str:
    """`path`, unless it is a pipeline output not made yet: then a MissingInput naming the stage that makes it
    (transformers would read the missing folder as a hub id and fail with `Repo id must be in the form ...`)."""
    if not Path(path).exists() and producer(path):
        raise missing_input(path)
    return path


def base_of_adapter(adapter_dir: str | Path) -> str:
    """The model an adapter was trained on: a path relative to the adapter folder, or a hub id."""
    base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    local = Path(adapter_dir) / base
    return str(local.resolve()) if not Path(base).is_absolute() and local.exists() else base


P_TUNING_ENCODER_HIDDEN = 64  # width of peft's MLP prompt encoder for method=p_tuning (posttrain.train.plan counts it)


def peft_config(adapter: AdapterConfig, task_type: str = "CAUSAL_LM"):
    """The peft config for `adapter.method`, or None for full / freeze training."""
    import peft

    m = adapter.method
    if m in ("full", "freeze", "bottleneck"):  # bottleneck: our own module, not peft (posttrain.model.bottleneck)
        return None
    if m == "qlora":
        require_qlora()
    if m in ("lora", "qlora", "dora"):
        return peft.LoraConfig(
            task_type=task_type, r=adapter.lora_r, lora_alpha=adapter.lora_alpha,
            lora_dropout=adapter.lora_dropout, target_modules=list(adapter.target_modules),
            use_dora=(m == "dora"),
        )
    if m == "ia3":
        ff = [t for t in adapter.target_modules if t in ("down_proj", "fc2", "mlp.c_proj")]
        return peft.IA3Config(task_type=task_type, target_modules=list(adapter.target_modules), feedforward_modules=ff)
    if m == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens)
    if m == "p_tuning":
        return peft.PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens, encoder_hidden_size=P_TUNING_ENCODER_HIDDEN
        )
    raise ValueError(f"unknown adapter method {m!r}")


def require_qlora() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); none is visible. "
                           "Use method: lora on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError("method=qlora needs bitsandbytes: pip install bitsandbytes") from e


def load_for_training(path: str | Path, adapter: AdapterConfig, trust_remote_code: bool = False):
    """Load the model a stage trains from: 4-bit for qlora, merged weights otherwise."""
    if adapter.method == "qlora":
        require_qlora()
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if is_adapter_dir(path):
            raise RuntimeError(f"qlora over an adapter folder ({path}) is not supported: export/merge it first")
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(local_path(str(path)), quantization_config=bnb,
                                                    trust_remote_code=trust_remote_code)
    model = load_model(path, merge=True, trust_remote_code=trust_remote_code)
    if hasattr(model, "peft_config"):
        raise RuntimeError(f"{path} is a prompt-learning adapter; a later stage cannot train on top of it. "
                           "Use a LoRA-family or full method upstream.")
    if adapter.method in ("full", "freeze") and bottleneck.carries(model):
        raise StageError(f"{path} carries a bottleneck adapter, which cannot be merged into the weights a "
                         f"method={adapter.method} stage trains and saves: use bottleneck or a LoRA-family method "
                         "for this stage, or another method upstream")
    return model


def apply_freeze(model, adapter: AdapterConfig) -> None:
    """method=freeze: train only the top `freeze_train_top_k` decoder layers and the final norm."""
    if adapter.method != "freeze":
        return
    layers = model.model.layers
    k = adapter.freeze_train_top_k
    if not 0 < k <= len(layers):
        raise ValueError(f"freeze_train_top_k={k} must be in 1..{len(layers)} (the model's layer count)")
    for p in model.parameters():
        p.requires_grad = False
    for layer in layers[-k:]:
        for p in layer.parameters():
            p.requires_grad = True
    for p in model.model.norm.parameters():
        p.requires_grad = True


def trainable_share(model) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}


def save_model(model, tokenizer, out_dir: str | Path, base_path: str | Path) -> None:
    """Save safetensors: the adapter only for PEFT models (pointing at `base_path`), else all weights."""
    _point_adapter_at(model, out_dir, base_path)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def save_trained(trainer, tokenizer, out_dir: str | Path, base_path: str | Path) -> None:
    """What save_model writes, through the trainer's own save path: every process calls it (FSDP's full state
    dict and DeepSpeed ZeRO-3 gather their shards collectively) and the main process writes `out_dir`."""
    _point_adapter_at(trainer.accelerator.unwrap_model(trainer.model), out_dir, base_path)
    trainer.save_model(str(out_dir))
    if trainer.args.should_save:
        (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)  # the trainer's pickle: a model folder holds no pickles
        tokenizer.save_pretrained(out_dir)


def _point_adapter_at(model, out_dir: str | Path, base_path: str | Path) -> None:
    """A PEFT model's adapter names `base_path` as its base: relative to the adapter's own folder where it is
    local (out_dir is a sibling-renamed temp dir of the final one), so the chain resolves from any working
    directory and in any clone."""
    if hasattr(model, "peft_config") or bottleneck.carries(model):
        local = Path(base_path).exists()
        base = os.path.relpath(Path(base_path).resolve(), Path(out_dir).resolve()) if local else str(base_path)
        if hasattr(model, "peft_config"):
            model.peft_config["default"].base_model_name_or_path = base
        else:
            bottleneck.point_at(model, base)


def param_count(path: str | Path) -> int:
    model = load_model(path)
    return sum(p.numel() for p in model.parameters())

