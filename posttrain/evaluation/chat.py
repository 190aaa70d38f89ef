"""Turning chat prompts (lists of messages) into token ids, the one way every scorer and generator does it."""

from __future__ import annotations


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt as the model sees it: the chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list[list[dict]], device):
    """A left-padded batch of chat prompts, ready for `model.generate` (new tokens start at the same column)."""
    tokenizer.padding_side = "left"
    texts = [prompt_text(tokenizer, p) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def prompt_and_answer_ids(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + eos): the answer as the assistant's turn after the prompt."""
    head = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head, tail
