"""The fixed life of a training stage, written once: every training stage (cpt, sft, rft, reward, judge, align,
distill) runs through it and names itself once.

    stage = TrainingStage("sft", cfg)
    if not cfg.enabled:
        return stage.pass_through(cfg.model)     # out_dir names the input model; metrics say skipped
    stage.seed()
    ...read and validate the data: a bad row stops the stage here, before anything is written...
    with stage.run(inputs):                       # checkpoints/<stage>/ (resume point) + the stage's MLflow run
        model = make_trainable(load_for_training(cfg.model, cfg.adapter), cfg.adapter)
        trainer = SFTTrainer(..., args=trainer_args(SFTConfig, cfg.train, stage.ckpt_dir, cfg.seed))
        metrics = stage.train(trainer)            # resumes from the last complete checkpoint
        return stage.finish(metrics, tokenizer=tokenizer, base_path=cfg.model, trainer=trainer)

A stage that must do slow work outside its MLflow run (distill's teacher answers) calls `stage.checkpoints`
and `stage.tracked` itself instead of `stage.run`. A step that may find the stage cannot run at all (no policy
pair, only empty teacher answers) runs under `stage.cleared_on_failure(...)`: a fresh run then leaves no
checkpoint folder behind. The trainers stay TRL's; the stage builds its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from posttrain.core.config import AdapterConfig
from posttrain.core.runtime import set_seed
from posttrain.core.tracking import stage_run
from posttrain.model.loading import apply_freeze, peft_config
from posttrain.train.outputs import finish, pass_through
from posttrain.train.training import clear_checkpoints, fingerprint, prepare_checkpoints, train_with_resume


@dataclass
class TrainingStage:
    """One run of training stage `name` on its config `cfg` (which carries seed, tracking and out_dir)."""

    name: str
    cfg: object
    inputs: dict[str, str | Path] = field(default_factory=dict)  # name -> file or folder the run reads
    ckpt_dir: Path | None = None  # checkpoints/<name>/: the trainer's output_dir
    resume: str | None = None  # the last complete checkpoint of these params and inputs, if any

    def pass_through(self, model: str | None) -> dict:
        """Switched off: out_dir passes `model` on (posttrain.train.outputs.pass_through)."""
        return pass_through(self.name, self.cfg, model)

    def seed(self) -> None:
        set_seed(self.cfg.seed)

    def checkpoints(self, inputs: dict[str, str | Path]) -> Path:
        """Find this run's checkpoint folder, fingerprinted by the config and `inputs`: a checkpoint made with
        other params or data is refused (posttrain.train.training.prepare_checkpoints)."""
        self.inputs = inputs
        self.ckpt_dir, self.resume = prepare_checkpoints(self.name, fingerprint(self.cfg, inputs))
        return self.ckpt_dir

    def tracked(self):
        """The stage's MLflow run, tagged with its inputs' digests; None in the other ranks of a launch."""
        return stage_run(self.name, self.cfg, inputs=self.inputs)

    @contextlib.contextmanager
    def run(self, inputs: dict[str, str | Path]) -> Iterator[object]:
        """checkpoints(inputs), then the body inside tracked()."""
        self.checkpoints(inputs)
        with self.tracked() as tracked:
            yield tracked

    @contextlib.contextmanager
    def cleared_on_failure(self, *errors: type[BaseException]) -> Iterator[None]:
        """A step that may find the stage cannot run: on one of `errors` a fresh run (nothing to resume) drops
        its checkpoint folder, so it leaves nothing behind; a resumed run keeps its checkpoints."""
        try:
            yield
        except errors:
            if self.resume is None:
                clear_checkpoints(self.name)
            raise

    def train(self, trainer) -> dict:
        """trainer.train(), resuming from this run's checkpoint; loss, time, tokens/s, memory (training.py).
        report_to: tensorboard writes under runs/<stage>/."""
        return train_with_resume(trainer, self.resume, runs_dir=Path("runs") / self.name)

    def finish(self, metrics: dict, **saved) -> dict:
        """Save the model (`saved`: trainer / model, tokenizer, base_path), log and write the metrics, drop the
        checkpoints (posttrain.train.outputs.finish). Call it inside run() / tracked()."""
        return finish(self.name, self.cfg, metrics, **saved)


def make_trainable(model, adapter: AdapterConfig, task_type: str = "CAUSAL_LM", head: str | None = None,
                   trainer_applies_peft: bool = False):
    """The model as `adapter.method` trains it: freeze: all but the top layers frozen; a PEFT method: wrapped in
    it (get_peft_model); bottleneck: frozen, with adapters attached (posttrain.model.bottleneck); full: as it is.
    `head` names a new module that always trains and, under PEFT, is saved with the adapter (the reward model's
    score head).

    trainer_applies_peft: return (model, peft config or None) and leave the wrapping to the trainer (TRL's
    preference and RL trainers, whose reference is then the model with the adapter off).
    """
    if adapter.method == "bottleneck":  # our own adapter module, not peft: the trainer gets no peft config
        from posttrain.model import bottleneck

        model = bottleneck.make_trainable(model, adapter, head=head)
        return (model, None) if trainer_applies_peft else model
    apply_freeze(model, adapter)
    if head is not None and adapter.method == "freeze":
        getattr(model, head).weight.requires_grad = True
    pc = peft_config(adapter, task_type=task_type)
    if pc is not None and head is not None:
        pc.modules_to_save = [head]
    if trainer_applies_peft:
        return model, pc
    if pc is not None:
        from peft import get_peft_model

        model = get_peft_model(model, pc)
    return model
