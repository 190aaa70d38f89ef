"""kill -9 in every training stage, then the same command again: it resumes from the last checkpoint, finishes, and
its metrics and weights equal an uninterrupted run's (issue 33).

For each stage (cpt, sft, reward, judge, align, rft, distill) on the tiny lineage: an uninterrupted reference run, and
a run SIGKILLed right after a checkpoint chosen by a seeded random among its save points (6 steps, a checkpoint every
2: killed after step 2 or 4, while training the next step), then started again. The rerun must say it resumed
from that checkpoint (log and metrics), write its model with no .tmp left and no checkpoint folder, and end with
the reference's metrics, to the bit, and its weights, to the byte. Only what measures the machine differs
(VOLATILE: wall time, tokens/s, memory), and `resumed_from_step`.

Each run is the stage's command line (`python -m stages.<name>`: its module run as __main__, argparse and all) in a
process of its own, forked from this warm test process rather than started afresh: a fresh interpreter spends ~12 s
importing trl and opening MLflow before the first step, which for 21 runs would be most of this file's time.
RESUME_TEST_EXEC=1 starts each run as a real `python -m stages.<name>` subprocess instead (slower, same asserts).
Measured times: docs/training.md.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_workdir, tiny_params

from posttrain.core.files import digest

STEPS = {"max_steps": 6, "save_steps": 2, "logging_steps": 2}  # save points 2 and 4 (6 is the end)
SAVE_POINTS = (2, 4)
# what measures the machine, not the run: cannot be equal across two runs, resumed or not
VOLATILE = {"train_wall_s", "tokens_per_s", "peak_memory_mb", "train_peak_memory_mb", "plan_estimate_mb",
            "plan_error_pct", "early_peak_memory_mb", "plan_error_early_pct", "tensor_peak_mb", "plan_tensors_mb",
            "plan_error_tensor_pct", "tensor_profiled_windows", "resumed_from_step",
            "teacher_tokens_per_s", "student_tokens_per_s", "speedup"}  # distill's generation speed
EXEC = os.environ.get("RESUME_TEST_EXEC") == "1"
COT = "data/cot.jsonl"


# ---------------------------------------------------------------- running a stage's command in a process of its own


class StageProcess:
    """`python -m stages.<name>` in `workdir` (stdout and stderr to log), forked from this process or exec'd."""

    def __init__(self, name: str, workdir: Path, log: Path):
        self.name, self.workdir, self.log = name, workdir, log
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlflow.db")
        out = open(log, "w")
        if EXEC:
            self.proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=workdir, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
            out.close()
            return
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: the stage's CLI, then out without running the parent's (pytest's) exit handlers
            code = 1
            try:
                os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
                # pytest's capture replaces sys.stdout/stderr with objects of its own (not fd 1/2): write to the log
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                os.chdir(workdir)
                os.environ.clear(), os.environ.update(env)
                sys.argv = [f"stages/{name}.py"]
                sys.modules.pop(f"stages.{name}", None)
                runpy.run_module(f"stages.{name}", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # as the interpreter would: a message to stderr, exit 1
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        out.close()
        self.pid, self.proc = pid, None

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.proc = _Done(os.waitstatus_to_exitcode(status))
        return self.proc.returncode

    def wait(self) -> int:
        if self.proc is not None:
            return self.proc.wait()
        _, status = os.waitpid(self.pid, 0)
        self.proc = _Done(os.waitstatus_to_exitcode(status))
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class _Done:
    def __init__(self, code: int):
        self.returncode = code

    def poll(self) -> int:
        return self.returncode

    def wait(self) -> int:
        return self.returncode


def run_to_end(name: str, workdir: Path, log: str) -> str:
    proc = StageProcess(name, workdir, workdir / log)
    code = proc.wait()
    assert code == 0, f"{name} exited {code}:\n{proc.output()[-3000:]}"
    return proc.output()


def complete_checkpoints(workdir: Path, name: str) -> list[int]:
    """Steps of the checkpoints whose trainer_state.json (written last) reads whole, as the resume takes them."""
    def complete(c: Path) -> bool:
        try:
            return isinstance(json.loads((c / "trainer_state.json").read_text()), dict)
        except (OSError, ValueError):
            return False

    root = workdir / "checkpoints" / name
    return sorted(int(c.name.split("-")[1]) for c in root.glob("checkpoint-*") if complete(c))


def kill_after_checkpoint(name: str, workdir: Path, step: int, timeout: float = 300) -> int:
    """Start the stage, SIGKILL it as soon as checkpoint-`step` is complete (it is then training step + 1);
    return the last complete checkpoint left behind."""
    proc = StageProcess(name, workdir, workdir / "killed.log")
    deadline = time.time() + timeout
    while True:
        done = complete_checkpoints(workdir, name)
        if done and done[-1] >= step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        code = proc.poll()
        assert code is None, f"{name} ended ({code}) before checkpoint-{step}:\n{proc.output()[-3000:]}"
        assert time.time() < deadline, f"{name}: no checkpoint-{step} after {timeout}s"
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL
    assert not (workdir / "models" / name).exists() and not (workdir / f"metrics/{name}.json").exists(), \
        "a killed stage must not leave an output"
    left = complete_checkpoints(workdir, name)
    assert left and left[-1] >= step
    return left[-1]


# ---------------------------------------------------------------- one stage: reference, killed, resumed


_EMPTY_STORE: list[Path] = []


def empty_mlflow_store() -> Path:
    """An MLflow sqlite store with its schema made, copied into each workdir: creating one costs a run ~5 s."""
    if not _EMPTY_STORE:
        import tempfile

        from mlflow import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="mlflow-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()
        _EMPTY_STORE.append(path)
    return _EMPTY_STORE[0]


def workdir(src: Path, path: Path, stage: str, copy=("data", "models"), **overrides) -> Path:
    settings = {**overrides.pop(stage, {})}
    settings["train"] = {**settings.get("train", {}), **STEPS}
    make_workdir(path, tiny_params(**{stage: settings}, **overrides))
    shutil.copy(empty_mlflow_store(), path / "mlflow.db")
    for name in copy:  # the stage's own output left out: a killed stage must leave none
        shutil.copytree(src / name, path / name, dirs_exist_ok=True,
                        ignore=lambda d, names: [stage] if Path(d) == src / "models" else [])
    return path


def check_kill_and_resume(stage: str, src: Path, tmp_path: Path, reference: Path | None = None, before_resume=None,
                          **overrides) -> dict:
    """Kill `stage` at a seeded-random save point, rerun it, compare with an uninterrupted run; the kill report.
    `before_resume(workdir)` runs between the kill and the rerun."""
    timings = {}
    t = time.perf_counter()
    if reference is None:
        reference = workdir(src, tmp_path / "reference", stage, **overrides)
        run_to_end(stage, reference, "reference.log")
    timings["reference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    work = workdir(src, tmp_path / "killed", stage, **overrides)
    step = random.Random(f"resume-{stage}").choice(SAVE_POINTS)
    left = kill_after_checkpoint(stage, work, step)
    timings["killed_s"] = time.perf_counter() - t

    if before_resume is not None:
        before_resume(work)

    t = time.perf_counter()
    out = run_to_end(stage, work, "resumed.log")  # the same command again
    timings["resumed_s"] = time.perf_counter() - t

    assert f"[resume] resuming from checkpoints/{stage}/checkpoint-{left} (step {left} of 6)" in out, out[-3000:]
    ref = json.loads((reference / f"metrics/{stage}.json").read_text())
    got = json.loads((work / f"metrics/{stage}.json").read_text())
    assert ref["resumed_from_step"] == 0 and got["resumed_from_step"] == left
    assert not (work / "checkpoints" / stage).exists(), "checkpoints are dropped once the stage finished"
    out_dir = work / "models" / stage
    assert out_dir.is_dir() and not [p for p in work.rglob("*.tmp*") if "mlflow" not in p.name], "a .tmp was left"
    weights = sorted(p.relative_to(out_dir) for p in out_dir.glob("*.safetensors"))
    assert weights, f"no weights in {out_dir}"
    for w in weights:
        assert digest(out_dir / w) == digest(reference / "models" / stage / w), f"{w} differs from the reference"
    differ = {k: (ref.get(k), got.get(k)) for k in sorted((set(ref) | set(got)) - VOLATILE) if ref.get(k) != got.get(k)}
    assert not differ, f"metrics of the resumed run differ from the uninterrupted run's: {differ}"
    report = {"stage": stage, "kill_after_checkpoint": step, "resumed_from": left,
              **{k: round(v, 1) for k, v in timings.items()}}
    print(f"[resume-test] {json.dumps(report)}")
    return report


# ---------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def reward_reference(lifecycle, tmp_path_factory) -> Path:
    """An uninterrupted reward run: the reward test's reference, and align's reward model (its policy pairs)."""
    wd = workdir(lifecycle["workdir"], tmp_path_factory.mktemp("reward") / "reference", "reward")
    run_to_end("reward", wd, "reference.log")
    return wd


@pytest.fixture(scope="module")
def memorised(lifecycle, tmp_path_factory) -> Path:
    """The lineage with models/sft overfitted on four chain-of-thought rows: rft's samples are then partly right
    (something to train on) and distill's teacher answers are non-empty (the tiny sft model answers whitespace)."""
    wd = make_workdir(tmp_path_factory.mktemp("memorised"), tiny_params(
        sft={"train_file": COT, "eval_file": COT,
             "train": {"max_steps": 200, "learning_rate": 1e-2, "batch_size": 4, "save_steps": 1000}}))
    shutil.copy(empty_mlflow_store(), wd / "mlflow.db")
    for name in ("data", "models"):
        shutil.copytree(lifecycle["workdir"] / name, wd / name, dirs_exist_ok=True)
    rows = [r for r in (wd / "data/processed/sft_train.jsonl").read_text().splitlines() if '"source": "cot"' in r]
    (wd / COT).write_text("\n".join(rows[:4]) + "\n")
    run_to_end("sft", wd, "memorise.log")
    return wd


def test_cpt_resumes_after_kill_9(lifecycle, tmp_path):
    check_kill_and_resume("cpt", lifecycle["workdir"], tmp_path)


def refused_with_other_params(work: Path) -> None:
    """Changed params after the kill: the rerun refuses the checkpoints (one line, no traceback, nothing written);
    with the params restored, the next run resumes."""
    params = (work / "params.yaml").read_text()
    changed = yaml.safe_load(params)
    changed["sft"]["train"]["learning_rate"] = 1.0e-4
    (work / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    proc = StageProcess("sft", work, work / "stale.log")
    assert proc.wait() == 1
    out = proc.output()
    assert "stale checkpoint: checkpoints/sft holds a checkpoint of 'sft' made with different params or data" in out
    assert "Traceback" not in out and not (work / "models/sft").exists()
    (work / "params.yaml").write_text(params)


def test_sft_resumes_after_kill_9_and_refuses_other_params(lifecycle, tmp_path):
    check_kill_and_resume("sft", lifecycle["workdir"], tmp_path, before_resume=refused_with_other_params)


def test_reward_resumes_after_kill_9(lifecycle, reward_reference, tmp_path):
    check_kill_and_resume("reward", lifecycle["workdir"], tmp_path, reference=reward_reference)


def test_judge_resumes_after_kill_9(lifecycle, tmp_path):
    check_kill_and_resume("judge", lifecycle["workdir"], tmp_path)


def test_align_resumes_after_kill_9(lifecycle, reward_reference, tmp_path):
    # the default method (dpo on policy pairs, LoRA): the pairs are sampled before training and cached for resume
    src = tmp_path / "src"
    for name in ("data", "models"):
        shutil.copytree(lifecycle["workdir"] / name, src / name)
    shutil.copytree(reward_reference / "models/reward", src / "models/reward")
    check_kill_and_resume("align", src, tmp_path)


def test_rft_resumes_after_kill_9(memorised, tmp_path):
    # the samples are drawn before training and cached for resume
    report = check_kill_and_resume("rft", memorised, tmp_path, rft={"train_file": COT, "num_samples": 4,
                                                                     "temperature": 1.0, "max_new_tokens": 64})
    assert json.loads((tmp_path / "killed/metrics/rft.json").read_text())["trained"] is True, report


def test_distill_resumes_after_kill_9(memorised, tmp_path):
    # sequence distillation: the teacher's answers are generated before training and cached for resume
    check_kill_and_resume("distill", memorised, tmp_path, distill={"teacher": "models/sft"})
