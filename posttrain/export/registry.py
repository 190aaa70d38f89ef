"""The MLflow model registry: log a model with the transformers flavour as a new version, move an alias to it."""

from __future__ import annotations

import importlib.metadata

from posttrain.core.config import StageError

RUNTIME_PACKAGES = ("transformers", "torch", "tokenizers", "accelerate", "safetensors")


class ExportError(StageError):
    """A model cannot be exported or registered; nothing was written."""

    label = "export"


def prompt_template(tokenizer) -> str:
    """The chat template rendered around one user turn, as MLflow's `{prompt}` template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\0"}], tokenize=False, add_generation_prompt=True)
    return text.replace("{", "{{").replace("}", "}}").replace("\0", "{prompt}")


def register(name: str, alias: str, model, tokenizer, card, tags: dict[str, str], max_new_tokens: int) -> str:
    """Log the model with the transformers flavour, register a new version of `name`, move `alias`, tag it."""
    import mlflow
    from mlflow.models import infer_signature

    # Explicit requirements: MLflow would otherwise import torchvision (not installed) to pin it,
    # and load the model in a subprocess to infer the rest.
    reqs = [f"{p}=={importlib.metadata.version(p)}" for p in RUNTIME_PACKAGES]
    signature = infer_signature(["prompt"], ["answer"], params={"max_new_tokens": max_new_tokens})
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
        registered_model_name=name, model_card=card, pip_requirements=reqs,
        prompt_template=prompt_template(tokenizer), signature=signature,
        model_config={"max_new_tokens": max_new_tokens, "return_full_text": False},
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, alias, version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    return version


def alias_version(name: str, alias: str) -> int | None:
    """The version `alias` points at now, or None (no such model or alias yet)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return int(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None
