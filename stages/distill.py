"""distill: the aligned teacher -> a smaller student.

`method: sequence` (sequence-level KD): the teacher answers the distillation prompts (greedy) and the
student is fine-tuned on those answers with TRL's SFTTrainer (loss on the answer only).
`method: logits`: the student matches the teacher's next-token distributions (generalized JSD, `beta`,
at `temperature`). `on_policy_share` is the share of steps trained on the student's own samples:
1.0 is TRL's DistillationTrainer (fully on-policy); below 1.0 TRL's GKDTrainer mixes on-policy steps
with steps on the teacher's answers (DistillationTrainer has no off-policy mix in TRL 1.16).

The student is `student.source: tiny` (a smaller Llama from `student.tiny`, sharing the teacher's
tokenizer; `init: teacher` starts it from the teacher's embeddings and `layers` of its layers) or any
Hugging Face id / local path (posttrain/train/student_init.py). Teacher and student are then scored side by side on
the evaluate suites (posttrain/train/distillation.py):
the student's scores, its share of the teacher's, the parameter ratio, agreement with the teacher,
the perplexity of the teacher's answers under the student (trained and untrained) and generation
tokens/s of both, measured in the same run on the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.core.config import TrackingConfig, TrainConfig
from posttrain.core.files import is_main_process, read_jsonl
from posttrain.evaluation.decoding import DecodeConfig
from posttrain.evaluation.suites import SUITES
from posttrain.model.loading import load_model, load_tokenizer
from posttrain.train.cli import run_stage
from posttrain.train.distillation import DistillError, SuiteConfig, compare, prompt_key, teacher_answers, write_report
from posttrain.train.harness import TrainingStage
from posttrain.train.student_init import CALIBRATION_TEXTS, StudentConfig, build_student
from posttrain.train.training import examples_needed, trainer_args

STAGE = "distill"


@dataclass(frozen=True)
class DistillConfig:
    seed: int
    tracking: TrackingConfig
    enabled: bool  # false: switched off, out_dir passes the input model on (no weights copied)
    teacher: str  # model folder of any stage (merged or adapter) or a Hugging Face id / path
    method: Literal["sequence", "logits"]
    prompt_files: list[str]  # JSONL with a "prompt" (messages) column; held-out eval prompts are dropped
    max_prompts: int  # cap on the distillation prompts (the first ones; repeats count)
    max_new_tokens: int  # length of the teacher's answers and of the student's on-policy samples
    gen_batch_size: int  # batch size of the teacher's answer generation
    decode: DecodeConfig  # params.yaml defaults.decode: how the teacher's and the suites' answers are decoded
    student: StudentConfig
    logits: LogitsConfig
    train: TrainConfig
    eval: SuiteConfig
    report: str
    out_dir: str


@dataclass(frozen=True)
class LogitsConfig:
    on_policy_share: float  # share of steps on the student's own samples (GKD's lmbda); 1.0 = DistillationTrainer
    temperature: float  # softens both distributions in the divergence (and the on-policy sampling)
    beta: float  # generalized JSD: 0 = forward KL, 0.5 = JSD, 1 = reverse KL


# ---------------------------------------------------------------- inputs


def check_teacher(path: str) -> None:
    """A local folder must exist; anything else must resolve as a Hugging Face id."""
    if Path(path).exists():
        return
    missing = DistillError(f"distill.teacher '{path}' not found: run the stage that writes it "
                           "(e.g. `dvc repro align`) or point distill.teacher at an existing model")
    if path.startswith((".", "/")) or Path(Path(path).parts[0]).is_dir():  # a local path, e.g. models/align
        raise missing
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception:  # not an id the hub (or its cache) knows
        raise missing from None


def load_prompts(cfg: DistillConfig) -> list[list[dict]]:
    """Distillation prompts, without any prompt held out in an evaluate suite, capped at max_prompts.

    Repeats are kept: the SFT mixture repeats its scarcer kinds (refusals) to reach its ratios, and the
    student should see them at those ratios too. The teacher answers each distinct prompt once.
    """
    held_out = {prompt_key(r["prompt"]) for s in SUITES if (p := Path(cfg.eval.data_dir) / f"eval_{s}.jsonl").exists()
                for r in read_jsonl(p)}
    prompts = []
    for f in cfg.prompt_files:
        if not Path(f).exists():
            raise DistillError(f"distill.prompt_files: {f} does not exist")
        for i, row in enumerate(read_jsonl(f)):
            if not isinstance(row.get("prompt"), list):
                raise DistillError(f"{f} row {i}: expected a 'prompt' list of messages")
            if prompt_key(row["prompt"]) not in held_out:
                prompts.append(row["prompt"])
    if not prompts:
        raise DistillError(
            f"distill: the prompt set is empty ({', '.join(cfg.prompt_files)} hold no prompt outside the "
            "evaluate suites); add prompts or point distill.prompt_files elsewhere"
        )
    return prompts[: min(cfg.max_prompts, examples_needed(cfg.train))]  # the teacher answers no more than is used


# ---------------------------------------------------------------- training


def _sequence_trainer(cfg, student, tokenizer, rows, ckpt_dir):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = trainer_args(SFTConfig, cfg.train, ckpt_dir, cfg.seed, report_to=cfg.tracking.report_to,
                        max_length=cfg.train.max_length,
                        completion_only_loss=True)
    return SFTTrainer(model=student, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _logits_trainer(cfg, student, teacher, tokenizer, rows, ckpt_dir):
    from datasets import Dataset

    lg = cfg.logits
    tokenizer.padding_side = "left"
    if lg.on_policy_share >= 1.0:  # fully on-policy: TRL's DistillationTrainer (prompts only)
        from trl import DistillationConfig, DistillationTrainer

        args = trainer_args(DistillationConfig, cfg.train, ckpt_dir, cfg.seed, report_to=cfg.tracking.report_to,
                            temperature=lg.temperature,
                            beta=lg.beta, max_completion_length=cfg.max_new_tokens)
        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                   processing_class=tokenizer)
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = trainer_args(GKDConfig, cfg.train, ckpt_dir, cfg.seed, report_to=cfg.tracking.report_to,
                        lmbda=lg.on_policy_share, beta=lg.beta,
                        temperature=lg.temperature, max_new_tokens=cfg.max_new_tokens,
                        max_length=cfg.train.max_length)
    data = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
    return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                      processing_class=tokenizer)


# ---------------------------------------------------------------- stage


def run(cfg: DistillConfig) -> dict:
    import copy

    import mlflow

    stage = TrainingStage(STAGE, cfg)
    if not cfg.enabled:
        return stage.pass_through(cfg.teacher)
    check_teacher(cfg.teacher)
    prompts = load_prompts(cfg)
    teacher, t_tok = load_model(cfg.teacher), load_tokenizer(cfg.teacher)
    calibration = [t_tok.apply_chat_template(p, tokenize=False) for p in prompts[:CALIBRATION_TEXTS]]
    student, s_tok = build_student(cfg, teacher, t_tok, calibration)
    initial = copy.deepcopy(student)  # the untrained student, measured against the trained one
    stage.seed()
    ckpt_dir = stage.checkpoints({"teacher": cfg.teacher, **{Path(f).stem: f for f in cfg.prompt_files}})
    answers = ckpt_dir / "teacher_answers.jsonl"
    if cfg.method == "logits" and cfg.logits.on_policy_share >= 1.0:
        rows = [{"prompt": p} for p in prompts]  # fully on-policy: the student writes every completion
    else:
        with stage.cleared_on_failure(DistillError):  # before the MLflow run: a teacher that cannot answer logs none
            rows = teacher_answers(cfg, teacher, t_tok, prompts, answers)
        print(f"[distill] teacher answered {len(rows)} of {len(prompts)} prompts", flush=True)
    with stage.tracked() as tracked:
        if tracked is not None and answers.exists():  # the main process logs; the others have no run
            mlflow.log_artifact(str(answers))
        if cfg.method == "sequence":
            trainer = _sequence_trainer(cfg, student, s_tok, rows, ckpt_dir)
        else:
            trainer = _logits_trainer(cfg, student, teacher, s_tok, rows, ckpt_dir)
        result = stage.train(trainer)
        student = trainer.model
        print(f"[distill] trained: loss {result['train_loss']:.3f} in {result['train_wall_s']:.0f}s", flush=True)
        compared, samples = compare(cfg, teacher, t_tok, student, s_tok, initial)
        metrics = {"method": cfg.method, "n_prompts": len(prompts),
                   "n_distinct_prompts": len({prompt_key(p) for p in prompts}), "n_train_rows": len(rows),
                   **result, **compared}
        if is_main_process():
            write_report(cfg.report, {"teacher": metrics["teacher"], "student": metrics["student"]}, samples)
        if tracked is not None:
            mlflow.log_artifact(cfg.report)
        stage.finish(metrics, tokenizer=s_tok, base_path=cfg.out_dir, trainer=trainer)
    print(f"[distill] student keeps {metrics['retained']} of the teacher's scores at "
          f"{metrics['param_ratio']:.2f}x its parameters, {metrics['speedup']:.2f}x its tokens/s", flush=True)
    return metrics


if __name__ == "__main__":
    run_stage(STAGE, DistillConfig, run, launchable=True)
