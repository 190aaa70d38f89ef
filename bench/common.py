"""What the benchmark scripts share: machine facts, load, RSS, medians, tables, subprocess workers.

Benchmarks print figures; nothing here asserts a time. Timings on a shared machine are noisy, so the
scripts run the variants they compare side by side in one run, interleaved and repeated, and report
medians together with the load average they were measured under.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from posttrain.core.markdown import markdown_table

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """'<cpu model>, <n> cores' or the GPU name: what the figures were measured on."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (+{os.cpu_count()} CPU cores)"
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def rss_mb() -> float:
    """This process's resident set now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def figure(v) -> str:
    """A benchmark figure: thousands without decimals, smaller values to 3 significant digits."""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table of figures (pasteable into the README)."""
    return markdown_table(headers, rows, cell=figure)


def git_dvc_init(path: Path) -> Path:
    """Make `path`, a copy of the code (tests' make_workdir, bench.lifecycle_time), a scratch git + DVC repository
    with everything in it committed, as a clone of this one would be."""
    for name in (".gitignore", ".dvcignore"):
        if not (path / name).exists():
            shutil.copy(REPO / name, path / name)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init"]):
        proc = subprocess.run(cmd, cwd=path, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed in {path}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return path


def run_worker(module: str, args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `python -m <module> <args>` from the repo root; its last stdout line is a JSON result."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


def build_with_stages(work: Path, stages: list[str], overrides: dict, profile: str = "default") -> Path:
    """Run `python -m stages.<name>` for each of `stages` in `work` on params.yaml (under `profile`) with
    `overrides`; returns models/base."""
    import yaml

    from posttrain.core.config import overlaid, read_params

    params = read_params(REPO / "params.yaml")
    if profile != "default":  # laid over here and written out whole
        params = overlaid(params, yaml.safe_load((REPO / "profiles" / f"{profile}.yaml").read_text()))
    for section, values in overrides.items():
        params[section] = {**params[section], **values}
    params["profile"] = "default"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "profiles", work / "profiles", dirs_exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    for stage in stages:
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"stages.{stage} failed:\n{proc.stderr[-3000:]}")
    return work / "models/base"
