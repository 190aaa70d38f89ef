"""Reward models: a one-output sequence classifier on a causal LM, loading a trained one (full weights or
adapter + score head), scoring (prompt, reply) pairs as TRL's trainers do, and reading preference pairs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from posttrain.core.config import ConfigError
from posttrain.evaluation.decoding import length_batches, progress
from posttrain.model.loading import (base_of_adapter, is_adapter_dir, is_passthrough, load_model, load_tokenizer,
                                     local_path, passed_on, require_qlora)


def sequence_classifier(path: str | Path, quantize: bool = False):
    """A one-output sequence classifier on the causal LM at `path` (a PEFT chain is merged first)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path)
    kwargs = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id, "use_safetensors": True}
    if quantize:
        require_qlora()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    if not is_adapter_dir(local_path(str(path))):
        return AutoModelForSequenceClassification.from_pretrained(local_path(str(path)), **kwargs)
    merged = load_model(path)
    if hasattr(merged, "peft_config"):
        raise RuntimeError(f"{path} is a prompt-learning adapter; a reward model cannot be built on it. "
                           "Use a LoRA-family or full method upstream.")
    with tempfile.TemporaryDirectory() as tmp:  # the merged weights, read back with a score head
        merged.save_pretrained(tmp, safe_serialization=True)
        return AutoModelForSequenceClassification.from_pretrained(tmp, **kwargs)


def load_reward_model(path: str | Path):
    """The trained reward model at `path`: full weights, or an adapter + score head over its backbone."""
    from transformers import AutoModelForSequenceClassification

    path = local_path(str(path))
    if not is_adapter_dir(path):
        return AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    from peft import PeftModel

    model = PeftModel.from_pretrained(sequence_classifier(base_of_adapter(path)), path)
    return model if model.peft_config["default"].is_prompt_learning else model.merge_and_unload()


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int,
                  max_length: int, desc: str = "reward") -> list[float]:
    """The reward of each (prompt messages, assistant reply), scored as TRL's trainers score it.

    Each text keeps its last `max_length` tokens (the reply and the end of the prompt: long transcripts, such
    as Anthropic HH's, would otherwise pad every batch to thousands of tokens), in batches of similar length.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    model.eval()
    texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
             for p, r in zip(prompts, replies)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    scores: list[float] = [0.0] * len(texts)
    with progress(len(texts), desc) as bar:
        for batch in length_batches([len(x) for x in ids], batch_size):
            enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, padding=True, padding_side="right",
                                return_tensors="pt").to(model.device)
            for i, score in zip(batch, model(**enc).logits[:, 0].float().tolist()):
                scores[i] = score
            bar.update(len(batch))
    return scores


def pairwise(model, tokenizer, pairs: list[dict], batch_size: int, max_length: int) -> dict[str, float]:
    """Held-out pairwise accuracy (chosen scored above rejected) and mean margin."""
    prompts = [r["prompt"] for r in pairs]
    chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in pairs], batch_size, max_length)
    rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in pairs], batch_size, max_length)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


def preference_rows(path: str) -> list[dict]:
    """Validated pairs {"prompt": messages, "chosen": str, "rejected": str}; bad rows raise DataError."""
    from posttrain.data.readers import (
        read_source,  # pandera: only the stages that read pairs pay its import
    )

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_source(path, "preference").rows]
    if not rows:
        raise ConfigError(f"{path}: no preference pairs; add a preference source to prepare.sources or switch the "
                          "stage off (enabled: false)")
    return rows


def trl_pairs(rows: list[dict]):
    """TRL's conversational preference form: prompt messages, one-message chosen / rejected."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def has_reward_model(path: str | Path) -> bool:
    """False where `path` is the folder of a switched-off reward stage (reward.enabled: false)."""
    return not (is_passthrough(path) and passed_on(path) is None)


def require_reward_model(path: str | Path, key: str, hint: str) -> None:
    if not has_reward_model(path):
        raise ConfigError(f"[{key}] {path} holds no reward model (reward.enabled: false): {hint}")
