"""Which LM head computes SFTTrainer's loss: TRL's fused one, or "compact" (labelled positions only).

TRL 1.16's SFTTrainer patches the model with a fused LM head (`fused_lm_head=True` returns per-token
log-probs, entropy and top-1 hits without the full logits). On a GPU it is a Triton kernel over the
labelled positions only. Without Triton (a CPU) it folds every position, prompt and padding included,
through torch ops on [tokens, vocab] tiles: measured here it was 65 % of an SFT step (bench.throughput's
CPU shape). "compact" keeps TRL's contract (the same FusedCausalLMOutput, so TRL's compute_loss, its
metrics and token counting run unchanged) but projects only the positions that carry a label and takes
plain log-softmax over them. It materialises [labelled tokens, vocab] logits, which is why the GPU keeps
the fused kernel (a 150k vocabulary would make them large).
"""

from __future__ import annotations

import types

import torch

CHOICES = ("auto", "fused", "compact")
ROW_BUCKET = 64  # labelled rows are padded to a multiple of this (few distinct shapes)


def resolve(choice: str, device: str | None = None) -> str:
    """The head `choice` means on `device` ("cuda" | "cpu"; default: this machine's)."""
    if choice not in CHOICES:
        raise ValueError(f"loss_head must be one of {CHOICES}, got {choice!r}")
    if choice == "auto":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return "fused" if device == "cuda" else "compact"
    return choice


def _unsupported(config) -> str | None:
    """What the compact head does not reproduce of TRL's fused one (it falls back to fused then)."""
    text = config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        if getattr(text, name, None) is not None:
            return name
    if getattr(text, "output_router_logits", False):
        return "output_router_logits"
    return None


def add_compact_lm_head(model) -> None:
    """Replace the fused head TRL put on `model` (a transformers model, not the peft wrapper)."""
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward  # TRL's: without fused_lm_head it is the model's own forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        targets = labels[mask]
        selected = hidden[mask]
        # Round the row count up: every distinct matmul shape gets its own cached oneDNN primitive on CPU, and a
        # new count each step grew the process by ~1.5 MB a step (measured, sft on the default).
        rows = selected.shape[0]
        padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
        if padded > rows:
            selected = torch.cat([selected, selected.new_zeros(padded - rows, selected.shape[1])])
        logits = self.get_output_embeddings()(selected)[:rows].float()
        with torch.no_grad():  # metrics only (TRL detaches them)
            is_top1 = logits.argmax(-1) == targets
        log_softmax = torch.log_softmax(logits, dim=-1)
        del logits  # at most two [rows, vocab] fp32 tensors alive at once (posttrain.train.plan counts them)
        target_log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -log_softmax.exp().mul_(log_softmax).sum(-1)

        def scatter(x):  # back to (batch, positions), zero where there is no label, like TRL's head
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = scatter(target_log_probs)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs,
                                   entropy=scatter(entropy), is_top1=scatter(is_top1), label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model.loss_head = "compact"  # what posttrain.train.plan reads to estimate this head's memory


def set_loss_head(trainer, choice: str) -> str:
    """Apply `choice` to an SFTTrainer's model; returns the head in use ("fused" or "compact")."""
    head = resolve(choice)
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if head == "compact":
        reason = _unsupported(model.config)
        if reason:
            print(f"[loss_head] compact does not model `{reason}`; keeping TRL's fused head", flush=True)
            return "fused"
        add_compact_lm_head(model)
    return head
