"""What the training stages share: trainer arguments from TrainConfig, and checkpoint/resume.

Checkpoints live in checkpoints/<stage>/ (outside DVC's outs, which DVC deletes before a stage runs)
next to a fingerprint of the stage's config and input data. A re-run after a kill resumes from the
last checkpoint; a checkpoint made with other params or data is refused, not silently mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from posttrain.core.config import StageError, TrainConfig
from posttrain.core.files import digest
from posttrain.core.runtime import resolve_precision, set_threads
from posttrain.train.distributed import main_first
from posttrain.train.memory.measure import MemoryWindow

CHECKPOINT_ROOT = Path("checkpoints")


class StaleCheckpointError(StageError):
    """The stage's checkpoints were made with other params or data: resuming from them would mix two runs."""

    label = "stale checkpoint"


def trainer_args(config_cls, train: TrainConfig, output_dir: str | Path, seed: int,
                 report_to: list[str] | tuple[str, ...] = ("mlflow",), held_out: bool = False, **extra):
    """Build a TRL/transformers *Config from TrainConfig; `extra` holds the trainer-specific fields.

    report_to: tracking.report_to (mlflow, tensorboard). held_out: the trainer is given an eval dataset, so
    train.eval_steps > 0 evaluates it every eval_steps steps (eval_loss curves); a stage without one passes False.
    """
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
        report_to=list(report_to),
        eval_strategy="steps" if held_out and train.eval_steps > 0 else "no",
        eval_steps=train.eval_steps if held_out and train.eval_steps > 0 else None,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only helps a GPU
        **extra,
    )


def logged(trainer, key: str) -> tuple[float | None, float | None]:
    """First and last logged value of a training metric (evaluation entries left out)."""
    values = [h[key] for h in trainer.state.log_history if key in h and "eval_loss" not in h]
    return (values[0], values[-1]) if values else (None, None)


def examples_needed(train: TrainConfig) -> int:
    """Training examples a run can consume: max_steps x batch_size x grad_accum (x processes when launched).
    Steps that generate their training data (policy pairs, the teacher's answers) generate no more."""
    return train.max_steps * train.batch_size * train.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))


def fingerprint(cfg, inputs: dict[str, str | Path]) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        h.update(f"{name}={digest(inputs[name])}".encode())
    return h.hexdigest()


def prepare_checkpoints(stage: str, fp: str) -> tuple[Path, str | None]:
    """Return (checkpoint dir, last checkpoint to resume from or None).

    A folder whose fingerprint differs is refused only when it holds a checkpoint to lose: a run that failed
    before its first checkpoint (bad data, a config error) left nothing worth keeping, so it is started afresh.
    Under a multi-process launch the main process tidies the folder first, and the others then find it tidied.
    """
    with main_first():
        return _prepare_checkpoints(stage, fp)


def _prepare_checkpoints(stage: str, fp: str) -> tuple[Path, str | None]:
    root = CHECKPOINT_ROOT / stage
    stamp = root / "fingerprint.txt"
    if root.exists() and stamp.exists() and stamp.read_text().strip() != fp:
        if any(_is_complete(c) for c in root.glob("checkpoint-*")):
            raise StaleCheckpointError(
                f"{root} holds a checkpoint of '{stage}' made with different params or data. "
                f"Restore them to resume, or delete {root} to start this stage afresh."
            )
        print(f"[resume] {root} holds no checkpoint of these params and data (an earlier run stopped before its "
              "first one): starting afresh", flush=True)
        shutil.rmtree(root)
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


def _run_totals_callback(trainer):
    """A callback that carries the whole run's running totals across a resume, so that a resumed run reports
    what an uninterrupted one does, bit for bit:

    - train_loss: the Trainer's is the mean over the steps of one train() call, after a resume over the steps since
      the checkpoint only. The running sum of the step losses (Trainer._total_loss_scalar plus what has not been
      logged yet) is saved and put back, and goes on in the same order as in an uninterrupted run (exactly so when
      save_steps is a multiple of logging_steps: the resumed sum then starts at a logging boundary);
    - num_tokens: TRL's count of the tokens trained on (_total_train_tokens: logged as num_tokens, and in
      evaluate()'s eval_num_tokens) lives in the trainer only and would restart from 0.

    Both are saved in each checkpoint's trainer_state.json (an ExportableState callback: written with the rest of
    the state, so a complete checkpoint always has them)."""
    from transformers.trainer_callback import ExportableState, TrainerCallback

    class RunTotals(TrainerCallback, ExportableState):
        def state(self) -> dict:
            pending = getattr(trainer, "_tr_loss", None)
            total = getattr(trainer, "_total_loss_scalar", 0.0) + (pending.item() if pending is not None else 0.0)
            return {"args": {}, "attributes": {"loss_sum": total,
                                               "train_tokens": getattr(trainer, "_total_train_tokens", None)}}

        def on_train_begin(self, args, state, control, **kwargs):
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if state.global_step > 0 and isinstance(saved, dict):
                trainer._total_loss_scalar = saved["attributes"]["loss_sum"]
                if saved["attributes"].get("train_tokens") is not None and hasattr(trainer, "_total_train_tokens"):
                    trainer._total_train_tokens = saved["attributes"]["train_tokens"]

    return RunTotals()


def train_with_resume(trainer, resume_from: str | None, runs_dir: str | Path | None = None) -> dict:
    """Train (resuming if a checkpoint is given); return loss, wall time, real tokens/s, peak memory, world size.

    train_loss is the mean step loss of the whole run, also when it resumed (_run_totals_callback). `runs_dir`:
    where report_to: tensorboard writes its event files (runs/<stage>/; the checkpoint folder is dropped on success).
    Under a multi-process launch every rank trains (and says so in the log); the numbers are rank 0's,
    except tokens, which TRL counts over all ranks.
    """
    from transformers.integrations import TensorBoardCallback

    from posttrain.core.runtime import peak_memory_mb

    trainer.add_callback(_run_totals_callback(trainer))
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and runs_dir is not None and cb.logging_dir is None:
            cb.logging_dir = str(runs_dir)
    resumed = int(Path(resume_from).name.split("-")[1]) if resume_from else 0
    if resume_from:
        print(f"[resume] resuming from {resume_from} (step {resumed} of {trainer.args.max_steps})", flush=True)
    memory = MemoryWindow(trainer)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    rank, world = trainer.args.process_index, trainer.args.world_size
    print(f"[train] rank {rank} of {world}: {trainer.state.global_step} steps in {wall:.1f}s", flush=True)
    # TRL logs the running count of real (non-pad) tokens as 'num_tokens'.
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    steps_run = max(trainer.state.global_step - resumed, 1)
    return {
        "train_loss": trainer._total_loss_scalar / max(trainer.state.global_step, 0.001),  # as the Trainer divides
        "train_wall_s": wall,
        "tokens_per_s": tokens * steps_run / max(trainer.state.global_step, 1) / wall if tokens else None,
        "peak_memory_mb": peak_memory_mb(),
        **memory.metrics(),
        "resumed_from_step": resumed,
        "world_size": world,
    }
