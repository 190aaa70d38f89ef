"""The memory estimate of a training step: weights, gradients, optimizer states, activations, LM head and (CPU)
runtime, from a model's shape and the stage's settings; also read off a live trainer (`trainer_estimate`),
which every training stage logs next to what it measured (posttrain.train.memory.measure).

  weights    all parameters as loaded (fp32; qlora: 4-bit linear layers) + a frozen reference where TRL keeps one
  grads      fp32, trainable parameters only; with one micro-batch per step backward makes them as it frees the
             activations (zero_grad drops them), so only what they exceed the activations and head by counts
  optimizer  AdamW: two fp32 states per trainable parameter
  activations what autograd saves for backward: per token and layer from the shape (coefficients in ACT_*),
             x tokens in the largest batch, times the method's share (freeze: the trained layers only; LoRA
             saves a little less, DoRA more); gradient checkpointing keeps one hidden state per layer plus one
             layer's worth
  lm head    the fused cross-entropy's tiles (TRL scores the vocabulary in 4096-token x 32768-column tiles), or
             with loss_head=compact (cpt/sft on CPU) the logits of the labelled tokens
  runtime    CPU only: what peak RSS holds beyond the tensors (oneDNN scratch, allocator slack; see
             CPU_RUNTIME_LAYERS), less what is allocated but never touched (the fused head's buffer past
             the vocabulary); `tensors` = total - runtime, what CUDA's max allocated counts
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20
METHODS = ("full", "freeze", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
           "bottleneck")
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")

# Bytes autograd keeps per token, per decoder layer, for each unit of a dimension: hidden h, query width
# q = heads x head_dim, key/value width kv = kv_heads x head_dim, MLP width I. Measured with
# torch.autograd.graph.saved_tensors_hooks on Llama blocks (SDPA attention, which saves no s x s scores).
ACT_FP32 = {"h": 16, "q": 16, "kv": 8, "I": 16}  # fp32: 4 hidden-sized, 4 query-sized, k and v, 4 MLP-sized tensors
ACT_BF16 = {"h": 14, "q": 14, "kv": 6, "I": 8}  # bf16 autocast: bf16 copies for the matmuls, fp32 norms/residuals
HEAD_PER_H = 12  # final norm and the hidden states the fused LM head keeps, fp32, per token and hidden unit
# Activation share of a method relative to full fine-tuning (frozen linear layers save no input for a weight grad;
# DoRA keeps the weight-norm terms). freeze is handled exactly: only the top k layers save anything.
METHOD_ACT = {"full": 1.0, "freeze": 1.0, "lora": 0.9, "qlora": 0.9, "dora": 1.8, "ia3": 1.15,
              "prompt_tuning": 1.15, "prefix_tuning": 1.15, "p_tuning": 1.15,
              "bottleneck": 0.95}  # bottleneck: not measured; frozen layers as LoRA, plus each adapter's input
# Besides what it saves, the step holds the temporaries of the layer it is in (norm upcasts, MLP products):
# tensors (torch.profiler's allocator totals, the quantity CUDA's max allocated counts), measured at 0.27 (fp32)
# and 0.42 (bf16 autocast) layers' worth of saved activations (Llama 4 x 256 blocks, 2048 and 8192 tokens).
TRANSIENT_LAYERS = 0.4
# On CPU the peak RSS holds more than the tensors at the step's peak: oneDNN's scratchpads and reorders, and
# the allocator's slack. Measured as 1.75 layers' worth in all (peak RSS of the same blocks), so 1.35 beyond
# the tensors; the plan lists it as `runtime`. (What RSS gains later, as batch shapes vary, is not in it.)
CPU_RUNTIME_LAYERS = 1.35
LM_TILE_TOKENS, LM_TILE_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob: tokens x vocabulary columns per tile
# Without Triton the LM head's backward folds each tile with torch ops: measured peak about 7.5 fp32 tile-sized
# temporaries besides the tile buffer itself (8.0-10.2 tiles in all, fp32 and bf16, 4096 and 8192 tokens).
CPU_TILE_COPIES = 7.5
# loss_head=compact (posttrain.model.lm_head) at its peak (backward): the saved log-softmax, its gradient, the logits'
# gradient and its compute-dtype copy. Measured peak RSS per [labelled token x vocab] entry: 12.7 (bf16 autocast)
# and 12.9 (fp32), 4096 and 8192 tokens x 8192 vocab.
COMPACT_BYTES = 13


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a decoder-only model's config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        h, q, kv, i = self.hidden, self.q, self.kv, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.modules().values())

    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.linear_params() + self.layers * 2 * self.hidden + self.hidden


def shape_of(config) -> Shape:
    """Shape from a transformers config (Llama, Qwen2, Mistral, ... style attribute names)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    return Shape(vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
                 kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                 head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                 intermediate=c.intermediate_size, tied=bool(getattr(c, "tie_word_embeddings", False)))


# ---------------------------------------------------------------- the estimate


def trainable_params(shape: Shape, method: str, adapter) -> int:
    """Parameters the optimizer updates for `method` (adapter: a posttrain.core.config.AdapterConfig or alike)."""
    h, L = shape.hidden, shape.layers
    targets = [m for m in adapter.target_modules if m in shape.modules()]
    dims = [shape.modules()[m] for m in targets]
    if method == "full":
        return shape.params()
    if method == "freeze":
        per_layer = sum(a * b for a, b in shape.modules().values()) + 2 * h
        return adapter.freeze_train_top_k * per_layer + h
    if method in ("lora", "qlora", "dora"):
        n = L * sum(adapter.lora_r * (a + b) for a, b in dims)
        return n + (L * sum(b for _, b in dims) if method == "dora" else 0)  # DoRA: a magnitude per output
    if method == "ia3":
        return L * sum(a if m == "down_proj" else b for m, (a, b) in zip(targets, dims))
    if method == "bottleneck":  # posttrain.model.bottleneck: down + up projections with biases per insertion
        from posttrain.model.bottleneck import insertions, params_per_insertion

        return insertions(L, adapter.placement) * params_per_insertion(h, adapter.reduction_factor)
    if method == "prompt_tuning":
        return adapter.num_virtual_tokens * h
    if method == "prefix_tuning":
        return adapter.num_virtual_tokens * 2 * L * shape.kv
    if method == "p_tuning":  # peft's MLP prompt encoder: h -> e -> e -> h, with biases
        from posttrain.model.loading import P_TUNING_ENCODER_HIDDEN as e

        return adapter.num_virtual_tokens * h + (h * e + e) + (e * e + e) + (e * h + h)
    raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")


def activation_bytes_per_token(shape: Shape, precision: str) -> tuple[float, float]:
    """(bytes per token per decoder layer, bytes per token for the head) that autograd keeps."""
    c = ACT_BF16 if precision in ("bf16", "fp16") else ACT_FP32
    layer = c["h"] * shape.hidden + c["q"] * shape.q + c["kv"] * shape.kv + c["I"] * shape.intermediate
    return layer, HEAD_PER_H * shape.hidden


def estimate(shape: Shape, *, method: str, adapter, precision: str, batch: int, seq_len: int, device: str,
             kind: str = "sft", gradient_checkpointing: bool = False, packed: bool = False,
             total_params: int | None = None, trainable: int | None = None, extra_frozen_params: int = 0,
             loss_head: str = "fused", labelled_tokens: int | None = None, grad_accum: int = 1) -> dict:
    """Peak training memory in MiB by component, and the total.

    kind: "sft" (SFTTrainer: cpt, sft, rft, distill sequence; fused LM head), "pairs" (DPO/ORPO: chosen and
    rejected in one batch, fused LM head), "reward" (pairs, a score head instead of the LM head), "online"
    (GRPO/RLOO: completions of max_length). extra_frozen_params: a frozen reference / teacher / reward model.
    total_params / trainable: exact counts when the model is at hand (the formula's otherwise).
    loss_head: "fused" (TRL's tiled head) or "compact" (posttrain.model.lm_head: plain logits where a label is).
    labelled_tokens: the most tokens with a label (SFT's completions) one batch can hold, which compact
    projects (default: every token of the batch).
    precision: the resolved one (fp32 | bf16 | fp16): half precision is autocast over fp32 weights.
    grad_accum: micro-batches per optimizer step; above 1 the gradients live through the next backward.
    """
    total = total_params if total_params is not None else shape.params()
    train = trainable if trainable is not None else trainable_params(shape, method, adapter)
    adapter_params = 0 if method in ("full", "freeze") else train
    base = total - adapter_params
    if method == "qlora":  # nf4 linear weights (+ one fp32 absmax per 64), the rest as loaded
        lin = shape.linear_params()
        weights = lin * (0.5 + 4 / 64) + (base - lin) * 4 + adapter_params * 4
    else:
        weights = base * 4 + adapter_params * 4
    weights += extra_frozen_params * 4
    grads = train * 4
    optimizer = train * 8

    sequences = batch * (2 if kind in ("pairs", "reward") else 1)
    seq = seq_len + (adapter.num_virtual_tokens if method in PROMPT_LEARNING else 0)
    tokens = sequences * seq
    layer, head = activation_bytes_per_token(shape, precision)
    layers_saving = adapter.freeze_train_top_k if method == "freeze" else shape.layers
    half = precision in ("bf16", "fp16")
    if gradient_checkpointing:  # one hidden state per layer, plus one layer recomputed in backward
        act = tokens * (shape.layers * 4 * shape.hidden + layer * METHOD_ACT[method] + head)
    else:
        act = tokens * (layers_saving * layer * METHOD_ACT[method] + head)
    act += tokens * layer * TRANSIENT_LAYERS
    runtime = tokens * layer * CPU_RUNTIME_LAYERS if device == "cpu" else 0.0
    if half:  # autocast keeps a half copy of each weight for the backward
        act += 2 * shape.linear_params() * layers_saving / shape.layers
    if not packed:  # SDPA keeps the padding mask, in the compute dtype, for each layer
        act += layers_saving * sequences * seq * seq * (2 if half else 4)

    lm_head = 0.0
    if kind != "reward":
        tile = min(tokens, LM_TILE_TOKENS) * min(shape.vocab, LM_TILE_VOCAB)
        # TRL allocates its tile buffer LM_TILE_VOCAB columns wide whatever the vocabulary: allocated (CUDA's
        # max allocated counts it), but on CPU the columns past the vocabulary are never touched, so not in RSS
        buffer = min(tokens, LM_TILE_TOKENS) * LM_TILE_VOCAB * (2 if half else 4)
        if loss_head == "compact":
            labelled = min(tokens, labelled_tokens) if labelled_tokens is not None else tokens
            lm_head = labelled * shape.vocab * COMPACT_BYTES + tokens * shape.hidden * 4
        elif device == "cuda":  # Triton folds the tile in place; the gradient GEMMs accumulate in fp32
            lm_head = buffer + tokens * shape.hidden * 4
        else:
            lm_head = buffer + tile * CPU_TILE_COPIES * 4 + tokens * shape.hidden * 4
            runtime -= buffer - tile * (2 if half else 4)
        if method == "full":
            lm_head += shape.vocab * shape.hidden * 4  # the fp32 gradient of the (tied) head
    if grad_accum == 1:  # the peak is at the start of backward (activations, head) or its end (all gradients)
        grads = max(0.0, grads - (act + lm_head))
    parts = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": act, "lm_head": lm_head,
             "runtime": runtime}
    out = {k: v / MiB for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["tensors"] = out["total"] - out["runtime"]  # what CUDA's max allocated / the CPU tensor peak compare to
    out.update(trainable_params=train, total_params=total, tokens=tokens)
    return out


def max_batch(shape: Shape, budget_mib: float, limit: int = 4096, **kw) -> int:
    """Largest power-of-two batch whose estimate fits `budget_mib` (0 if not even batch 1 fits)."""
    best, b = 0, 1
    while b <= limit and estimate(shape, batch=b, **kw)["total"] <= budget_mib:
        best, b = b, b * 2
    return best


# ---------------------------------------------------------------- a live trainer (what train_with_resume logs)


def _longest_row(trainer, cap: int | None) -> int | None:
    """Longest tokenised training row (capped at max_length): the largest batch is padded to it."""
    ds = getattr(trainer, "train_dataset", None)
    columns = getattr(ds, "column_names", None) or []
    lengths = []
    # TRL 1.x names (reward: chosen_ids / rejected_ids; DPO: prompt_ids + chosen_ids / rejected_ids), then 0.x's
    for prompt, chosen, rejected, single in (("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids"),
                                             ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                                              "completion_input_ids")):
        for col in ("input_ids", chosen, rejected, single):
            if col in columns:
                lengths.append(max((len(x) for x in ds[col]), default=0))
        if prompt in columns and chosen in columns:  # DPO: prompt + answer in one row
            lengths.append(max(len(p) + max(len(c), len(r)) for p, c, r in
                               zip(ds[prompt], ds[chosen], ds[rejected])))
    if not lengths:
        return cap
    longest = max(lengths)
    return min(longest, cap) if cap else longest


def _labelled_tokens(trainer, batch: int, cap: int | None) -> int | None:
    """Most labelled tokens one batch can hold: the `batch` rows with the most labels (within max_length).

    TRL 1.x leaves `labels` (-100 where there is no loss: prompt, padding) in the tokenised dataset; a
    `completion_mask` (1 = loss) where a dataset brings its own. None where neither is there (all count).
    """
    ds = getattr(trainer, "train_dataset", None)
    columns = getattr(ds, "column_names", None) or []
    if "labels" in columns:
        counts = [sum(1 for x in row[:cap] if x != -100) for row in ds["labels"]]
    elif "completion_mask" in columns:
        counts = [sum(row[:cap]) for row in ds["completion_mask"]]
    else:
        return None
    return sum(sorted(counts)[-batch:])


def _modules(trainer):
    import torch

    seen = []
    for name in ("ref_model", "teacher_model", "reward_model"):
        m = getattr(trainer, name, None)
        if isinstance(m, torch.nn.Module):
            seen.append(m)
    for m in getattr(trainer, "reward_funcs", None) or []:
        if isinstance(m, torch.nn.Module):
            seen.append(m)
    return seen


def resident_modules(trainer) -> list:
    """The models a trainer holds: the one it trains, and any frozen reference / teacher / reward model."""
    return [trainer.model, *_modules(trainer)]


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules`, each storage counted once."""
    storages = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def trainer_estimate(trainer) -> dict:
    """The plan for the run `trainer` is about to do: its model, args and data (MiB by component)."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shape = shape_of(base.config)
    args = trainer.args
    kind = type(trainer).__name__
    kind = ("reward" if kind == "RewardTrainer" else "pairs" if kind in ("DPOTrainer", "ORPOTrainer", "CPOTrainer")
            else "online" if kind in ("GRPOTrainer", "RLOOTrainer") else "sft")
    max_length = getattr(args, "max_length", None)
    if kind == "online":
        seq = (getattr(args, "max_prompt_length", None) or 0) + args.max_completion_length
        seq = max(seq, _longest_row(trainer, None) or 0)
    else:
        seq = _longest_row(trainer, max_length) or max_length or 512
    method = "full"
    if getattr(base, "bottleneck_adapters", None) and base.bottleneck_adapters[-1]["trainable"]:
        method = "bottleneck"
    elif hasattr(model, "peft_config"):
        pc = model.peft_config["default"]
        name = type(pc).__name__
        method = {"LoraConfig": "dora" if getattr(pc, "use_dora", False) else "lora", "IA3Config": "ia3",
                  "PromptTuningConfig": "prompt_tuning", "PrefixTuningConfig": "prefix_tuning",
                  "PromptEncoderConfig": "p_tuning"}.get(name, "lora")
        if getattr(base, "is_loaded_in_4bit", False):
            method = "qlora"
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers_trained = _layers_trained(base)
    if method == "full" and trainable < total and layers_trained is not None:
        method = "freeze"
    adapter = AdapterShape(freeze_train_top_k=layers_trained or shape.layers,
                            num_virtual_tokens=getattr(getattr(model, "peft_config", {}).get("default"),
                                                       "num_virtual_tokens", 0) or 0)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    device = "cuda" if _on_cuda(base) else "cpu"
    packed = bool(getattr(args, "packing", False) or getattr(args, "padding_free", False))
    extra = sum(sum(p.numel() for p in m.parameters()) for m in _modules(trainer))
    return estimate(shape, method=method, adapter=adapter, precision=precision, batch=args.per_device_train_batch_size,
                    seq_len=seq, device=device, kind=kind, gradient_checkpointing=bool(args.gradient_checkpointing),
                    packed=packed, total_params=total, trainable=trainable, extra_frozen_params=extra,
                    loss_head=getattr(base, "loss_head", "fused"), grad_accum=args.gradient_accumulation_steps,
                    labelled_tokens=_labelled_tokens(trainer, args.per_device_train_batch_size, max_length))


@dataclass(frozen=True)
class AdapterShape:
    freeze_train_top_k: int
    num_virtual_tokens: int
    target_modules: tuple = ()
    lora_r: int = 0
    reduction_factor: int = 16
    placement: str = "houlsby"


def _layers_trained(model) -> int | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    return sum(1 for layer in layers if any(p.requires_grad for p in layer.parameters()))


def _on_cuda(model) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"
