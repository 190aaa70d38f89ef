"""Measuring a training run's memory next to its estimate (posttrain.train.memory.estimate).

Every training stage logs the measured peaks beside the plan; see MemoryWindow.
"""

from __future__ import annotations


class MemoryWindow:
    """The training run's measured peak next to posttrain.train.plan's estimate for it (metrics of every training
    stage).

    train_peak_memory_mb: CUDA max allocated during training; on CPU the peak RSS during training less the
    runtime baseline (RSS before training minus the models' own bytes), i.e. models + what training allocates,
    which is what the plan estimates. plan_error_pct = (estimate - measured) / measured.
    tensor_peak_mb / plan_tensors_mb / plan_error_tensor_pct: the most bytes live tensors held, the quantity
    CUDA's max allocated counts, next to the plan less its CPU `runtime` part. On CUDA that is max allocated
    through the first TENSOR_STEPS steps. On CPU torch keeps no allocator statistics, so steps run under
    torch.profiler(profile_memory=True): the first TENSOR_STEPS steps (the optimizer's states are made there),
    then any later step whose batch holds more tokens than every profiled one. With random batches the
    longest rows come at some later step, and the plan is sized for them (the default distill: the first two
    steps held 224 MiB against a plan of 329). Each window's peak counts what was live when it opened: the
    models, the optimizer's states and any gradients.
    early_peak_memory_mb / plan_error_early_pct: the same as train_peak_memory_mb through the first
    TENSOR_STEPS steps. On CPU the early and whole-run peaks differ mostly by what the runtime keeps as batch
    shapes vary (glibc's freed-but-held heap, oneDNN's primitive cache): probed on the default sft, peak RSS at
    step 200 was ~200 MiB above the early one. The profiler's event buffers are RSS too and stay in the
    measure (on the default's cpt +6 % on the whole-run peak); building its results afterwards took another
    ~40 MiB there, so the peak is read before that and the window restarts after it. (Restarting it after the
    profiled steps instead would miss the first batch, the longest with group_by_length: -19 % on the bench's
    SFT.)
    """

    def __init__(self, trainer, profile_longer_batches: bool = True):
        """profile_longer_batches=False keeps the CPU profiler to the first steps, so that every run pays the
        same overhead whatever its batch order (the throughput bench times stock TRL's random batches)."""
        import torch

        from posttrain.core.runtime import reset_peak_memory
        from posttrain.train.memory.estimate import (
            MiB,
            module_bytes,
            resident_modules,
            trainer_estimate,
        )

        try:
            self.plan_parts = trainer_estimate(trainer)  # by component: what a mismatch is read against
            self.plan = self.plan_parts["total"]
        except Exception as e:  # the estimate is advisory: a model it cannot read must not stop training
            print(f"[plan] no memory estimate for this run: {type(e).__name__}: {e}", flush=True)
            self.plan_parts, self.plan = None, None
        in_use = reset_peak_memory()
        self.models_mb = module_bytes(*resident_modules(trainer)) / MiB
        self.baseline = 0.0 if torch.cuda.is_available() else in_use - self.models_mb
        self.early = None
        self.tensors = None
        self.profiled_peak = 0.0  # the profiled steps' peak RSS, read before the profiler's results are built
        self.profiled_tokens = 0  # the largest batch (in token ids) a profiled step trained on
        self.profiled_windows = 0
        trainer.add_callback(_early_peaks(self, trainer))
        if profile_longer_batches and not torch.cuda.is_available():
            _profile_longer_batches(self, trainer)

    def measured(self) -> float:
        from posttrain.core.runtime import peak_memory_mb

        return max(peak_memory_mb(), self.profiled_peak) - self.baseline

    def metrics(self) -> dict:
        measured = self.measured()
        early = self.early if self.early is not None else measured  # a run shorter than TENSOR_STEPS
        plan_tensors = self.plan_parts and self.plan_parts["tensors"]
        return {"train_peak_memory_mb": measured, "plan_estimate_mb": self.plan,
                "plan_error_pct": _error(self.plan, measured),
                "early_peak_memory_mb": early, "plan_error_early_pct": _error(self.plan, early),
                "tensor_peak_mb": self.tensors, "plan_tensors_mb": plan_tensors,
                "plan_error_tensor_pct": _error(plan_tensors, self.tensors),
                "tensor_profiled_windows": self.profiled_windows}


def _error(plan: float | None, measured: float | None) -> float | None:
    """(plan - measured) / measured, in %; None where either is missing."""
    return None if plan is None or measured is None else 100 * (plan - measured) / measured


TENSOR_STEPS = 2  # the second step is the first with the optimizer's states in memory (AdamW makes them lazily)


class _TensorWindow:
    """A stretch of training under torch.profiler(profile_memory=True) (CPU): on close, raises the window's
    tensor peak to the most bytes allocated in it and held at once, plus `live_mb` held when it opened."""

    def __init__(self, window: MemoryWindow, live_mb: float):
        from torch.profiler import ProfilerActivity, profile

        self.window, self.live_mb = window, live_mb
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def close(self):
        import gc

        from posttrain.core.runtime import peak_memory_mb, reset_peak_memory

        window = self.window
        window.profiled_peak = max(window.profiled_peak, peak_memory_mb())
        self.profiler.__exit__(None, None, None)
        peak = allocated_peak_mb(self.profiler)
        if peak is not None:
            window.tensors = max(window.tensors or 0.0, peak + self.live_mb)
        window.profiled_windows += 1
        self.profiler = None
        gc.collect()
        reset_peak_memory()  # building the results above took RSS of its own: not training's


def _live_tensors_mb(trainer, window: MemoryWindow) -> float:
    """MiB that training holds between steps: the models, the optimizer's states, gradients not yet cleared."""
    import torch

    optimizer = trainer.optimizer
    states = [] if optimizer is None else [t for state in optimizer.state.values() for t in state.values()]
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    extra = sum(t.numel() * t.element_size() for t in [*states, *grads] if isinstance(t, torch.Tensor))
    return window.models_mb + extra / 2**20


def _batch_tokens(inputs) -> int:
    """The size a step's activations grow with: elements of the batch's 2-D integer tensors (token ids, masks,
    labels), 0 where the batch is not a dict of tensors (GRPO/RLOO get prompts and generate)."""
    import torch

    if not isinstance(inputs, dict):
        return 0
    return sum(v.numel() for v in inputs.values()
               if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point())


def _early_peaks(window: MemoryWindow, trainer):
    """Callback: the tensor peak and the early peak, both of the first TENSOR_STEPS steps."""
    import torch
    from transformers import TrainerCallback

    class EarlyPeaks(TrainerCallback):
        profiled = None
        steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.steps == 0 and self.profiled is None and not torch.cuda.is_available():
                self.profiled = _TensorWindow(window, _live_tensors_mb(trainer, window))

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if self.steps == TENSOR_STEPS:
                window.early = window.measured()
                self.stop()

        def on_train_end(self, args, state, control, **kwargs):
            self.stop()  # a run shorter than TENSOR_STEPS

        def stop(self):
            if self.profiled is not None:
                self.profiled.close()
                self.profiled = None
            elif torch.cuda.is_available() and window.tensors is None:
                window.tensors = torch.cuda.max_memory_allocated() / 2**20

    return EarlyPeaks()


def _profile_longer_batches(window: MemoryWindow, trainer) -> None:
    """After the first TENSOR_STEPS steps, profile each micro-batch longer than every one profiled before
    (a few times a run with random batches: the longest so far changes ~ln(steps) times; with
    group_by_length the first batch is the longest and nothing more is profiled)."""
    training_step = trainer.training_step

    def profiled_training_step(model, inputs, *args, **kwargs):
        tokens = _batch_tokens(inputs)
        if window.early is None:  # inside the first steps' window
            window.profiled_tokens = max(window.profiled_tokens, tokens)
            return training_step(model, inputs, *args, **kwargs)
        if tokens <= window.profiled_tokens:
            return training_step(model, inputs, *args, **kwargs)
        window.profiled_tokens = tokens
        profiled = _TensorWindow(window, _live_tensors_mb(trainer, window))
        try:
            return training_step(model, inputs, *args, **kwargs)
        finally:
            profiled.close()

    trainer.training_step = profiled_training_step


def allocated_peak_mb(profiler) -> float | None:
    """Most MiB of CPU memory allocated during a torch.profiler(profile_memory=True) window and held at once.

    c10's CPU allocator reports with each allocation and free its running total of what it saw allocated
    while profiling and not yet freed. That total lives as long as the process and does not drop for blocks
    freed while nothing profiled, so the window's peak is its largest total less the total when it opened
    (the first event's, before that event). (A private torch API: if it moves, the metric is missing.)
    """
    try:
        events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        if not events:
            return 0.0
        events.sort()
        _, first_size, first_total = events[0]
        opened_at = first_total - first_size
        return max(0, max(total for _, _, total in events) - opened_at) / 2**20
    except Exception as e:
        print(f"[plan] no tensor peak for this run: {type(e).__name__}: {e}", flush=True)
        return None
