"""What the training stages share: trainer arguments from TrainConfig, and checkpoint/resume.

Checkpoints live in checkpoints/<stage>/ (outside DVC's outs, which DVC deletes before a stage runs)
next to a fingerprint of the stage's config and input data. A re-run after a kill resumes from the
last checkpoint; a checkpoint made with other params or data is refused, not silently mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from stages.common import digest, resolve_precision, set_threads
from stages.config import TrainConfig

CHECKPOINT_ROOT = Path("checkpoints")


class StaleCheckpointError(RuntimeError):
    pass


def trainer_args(config_cls, train: TrainConfig, output_dir: str | Path, seed: int, **extra):
    """Build a TRL/transformers *Config from TrainConfig; `extra` holds the trainer-specific fields."""
    import torch

    set_threads(train.num_threads)
    precision = resolve_precision(train.precision)
    return config_cls(
        output_dir=str(output_dir),
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=int(train.warmup_ratio * train.max_steps),
        weight_decay=train.weight_decay,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),  # lets transformers autocast bf16 on a CPU that has it
        activation_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to=["mlflow"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps a GPU
        **extra,
    )


def fingerprint(cfg, inputs: dict[str, str | Path]) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        h.update(f"{name}={digest(inputs[name])}".encode())
    return h.hexdigest()


def prepare_checkpoints(stage: str, fp: str) -> tuple[Path, str | None]:
    """Return (checkpoint dir, last checkpoint to resume from or None)."""
    root = CHECKPOINT_ROOT / stage
    stamp = root / "fingerprint.txt"
    if root.exists() and stamp.exists() and stamp.read_text().strip() != fp:
        raise StaleCheckpointError(
            f"{root} holds a checkpoint of '{stage}' made with different params or data. "
            f"Restore them to resume, or delete {root} to start this stage afresh."
        )
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)
    ckpts = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [c for c in ckpts if _is_complete(c)]
    for c in ckpts:  # a kill while the Trainer was writing one leaves it half-written: drop it, keep the previous
        if c not in complete:
            print(f"[resume] {c} was not completely written (killed while saving); removing it", flush=True)
            shutil.rmtree(c, ignore_errors=True)
    return root, (str(complete[-1]) if complete else None)


def _is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last (after weights, optimizer and RNG state)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def clear_checkpoints(stage: str) -> None:
    shutil.rmtree(CHECKPOINT_ROOT / stage, ignore_errors=True)


def train_with_resume(trainer, resume_from: str | None) -> dict:
    """Train (resuming if a checkpoint is given); return loss, wall time, real tokens/s, peak memory, world size.

    Under a multi-process launch every rank trains (and says so in the log); the numbers are rank 0's,
    except tokens, which TRL counts over all ranks.
    """
    from stages.common import peak_memory_mb

    memory = MemoryWindow(trainer)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    rank, world = trainer.args.process_index, trainer.args.world_size
    print(f"[train] rank {rank} of {world}: {trainer.state.global_step} steps in {wall:.1f}s", flush=True)
    # TRL logs the running count of real (non-pad) tokens as 'num_tokens'.
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    resumed = int(Path(resume_from).name.split("-")[1]) if resume_from else 0
    steps_run = max(trainer.state.global_step - resumed, 1)
    return {
        "train_loss": result.training_loss,
        "train_wall_s": wall,
        "tokens_per_s": tokens * steps_run / max(trainer.state.global_step, 1) / wall if tokens else None,
        "peak_memory_mb": peak_memory_mb(),
        **memory.metrics(),
        "resumed_from_step": resumed,
        "world_size": world,
    }


class MemoryWindow:
    """The training run's measured peak next to stages.plan's estimate for it (metrics of every training stage).

    train_peak_memory_mb: CUDA max allocated during training; on CPU the peak RSS during training less the
    runtime baseline (RSS before training minus the models' own bytes), i.e. models + what training allocates,
    which is what the plan estimates. plan_error_pct = (estimate - measured) / measured.
    tensor_peak_mb / plan_tensors_mb / plan_error_tensor_pct: the most bytes live tensors held during the first
    TENSOR_STEPS steps, the quantity CUDA's max allocated counts, next to the plan less its CPU `runtime` part.
    On CPU torch keeps no allocator statistics, so those steps run under torch.profiler(profile_memory=True):
    the most they allocated and held at once, plus the models' own bytes (as CUDA counts the weights).
    early_peak_memory_mb / plan_error_early_pct: the same as train_peak_memory_mb through those steps. On CPU
    the early and whole-run peaks differ mostly by what the runtime keeps as batch shapes vary (glibc's
    freed-but-held heap, oneDNN's primitive cache): probed on the default sft, peak RSS at step 200 was ~200 MiB
    above the early one. The profiler's event buffers are RSS too and stay in the measure (on the default's cpt
    +6 % on the whole-run peak); building its results afterwards took another ~40 MiB there, so the peak is
    read before that and the window restarts after it. (Restarting it after the profiled steps
    instead would miss the first batch, the longest with group_by_length: -19 % on the bench's SFT.)
    """

    def __init__(self, trainer):
        import torch

        from stages.common import reset_peak_memory
        from stages.plan import MiB, module_bytes, resident_modules, trainer_estimate

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
        trainer.add_callback(_early_peaks(self))

    def measured(self) -> float:
        from stages.common import peak_memory_mb

        return max(peak_memory_mb(), self.profiled_peak) - self.baseline

    def metrics(self) -> dict:
        measured = self.measured()
        early = self.early if self.early is not None else measured  # a run shorter than TENSOR_STEPS
        plan_tensors = self.plan_parts and self.plan_parts["tensors"]
        return {"train_peak_memory_mb": measured, "plan_estimate_mb": self.plan,
                "plan_error_pct": _error(self.plan, measured),
                "early_peak_memory_mb": early, "plan_error_early_pct": _error(self.plan, early),
                "tensor_peak_mb": self.tensors, "plan_tensors_mb": plan_tensors,
                "plan_error_tensor_pct": _error(plan_tensors, self.tensors)}


def _error(plan: float | None, measured: float | None) -> float | None:
    """(plan - measured) / measured, in %; None where either is missing."""
    return None if plan is None or measured is None else 100 * (plan - measured) / measured


TENSOR_STEPS = 2  # the second step is the first with the optimizer's states in memory (AdamW makes them lazily)


def _early_peaks(window: MemoryWindow):
    """Callback: the tensor peak and the early peak, both of the first TENSOR_STEPS steps."""
    import gc

    import torch
    from transformers import TrainerCallback

    from stages.common import peak_memory_mb, reset_peak_memory

    class EarlyPeaks(TrainerCallback):
        profiler = None
        steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.steps == 0 and self.profiler is None and not torch.cuda.is_available():
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1
            if self.steps == TENSOR_STEPS:
                window.early = window.measured()
                self.stop()

        def on_train_end(self, args, state, control, **kwargs):
            self.stop()  # a run shorter than TENSOR_STEPS

        def stop(self):
            if self.profiler is not None:
                window.profiled_peak = peak_memory_mb()
                self.profiler.__exit__(None, None, None)
                peak = _allocated_peak_mb(self.profiler)  # what the steps allocated; the models were there before
                window.tensors = None if peak is None else peak + window.models_mb
                self.profiler = None
                gc.collect()
                reset_peak_memory()  # building the results above took RSS of its own: not training's
            elif torch.cuda.is_available() and window.tensors is None:
                window.tensors = torch.cuda.max_memory_allocated() / 2**20

    return EarlyPeaks()


def _allocated_peak_mb(profiler) -> float | None:
    """Most MiB of CPU memory allocated during a torch.profiler(profile_memory=True) window and held at once.

    c10's CPU allocator reports each allocation's running total of what was allocated inside the window and
    is still live; its maximum is the window's peak. (A private torch API: if it moves, the metric is missing.)
    """
    try:
        peak, stack = 0, list(profiler.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
                peak = max(peak, fields.total_allocated)
        return peak / 2**20
    except Exception as e:
        print(f"[plan] no tensor peak for this run: {type(e).__name__}: {e}", flush=True)
        return None
