"""DVC through its public command line, for the lifecycle flow: run a command streaming its output, the stages in DAG
order with what each needs and writes, and params.yaml overrides written as `dvc exp run -S` writes them."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

PROGRESS_EVERY_S = 5.0  # a progress bar redraws itself many times a second: log one state every few seconds
TAIL_LINES = 25


class DvcFailed(RuntimeError):
    pass


def dvc(root: Path, *args: str, env: dict[str, str] | None = None, emit=lambda line: None) -> str:
    """`dvc <args>` in `root`, each output line passed to `emit` as it comes (a progress bar's redraws at most every
    few seconds); its output, or DvcFailed with the last of it."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: list[str] = []
    buf, last_progress = b"", 0.0
    while chunk := proc.stdout.read1(1 << 16):
        buf += chunk
        while m := re.search(rb"[\r\n]", buf):
            text, redraw, buf = buf[: m.start()].decode(errors="replace").rstrip(), m.group() == b"\r", buf[m.end():]
            if not text:
                continue
            lines.append(text)
            if redraw:
                if time.monotonic() - last_progress < PROGRESS_EVERY_S:
                    continue
                last_progress = time.monotonic()
            emit(text)
    if text := buf.decode(errors="replace").strip():
        lines.append(text)
        emit(text)
    if rc := proc.wait():
        raise DvcFailed(f"dvc {args[0]} failed (exit {rc}); last output:\n" + "\n".join(lines[-TAIL_LINES:]))
    return "\n".join(lines)


def dvc_stages(root: Path) -> dict[str, dict]:
    """Every stage in DAG order (`dvc dag`; dvc.yaml order breaks ties): the stages upstream of it and its outputs."""
    import networkx as nx

    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    dot = dvc(root, "dag", "--dot")
    graph = nx.DiGraph(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))  # upstream -> downstream
    graph.add_nodes_from(spec)
    position = {name: i for i, name in enumerate(spec)}
    stages = {}
    for name in nx.lexicographical_topological_sort(graph, key=position.get):
        outs = {path: (kind, flags or {}) for kind in ("outs", "metrics", "plots") for o in spec[name].get(kind, [])
                for path, flags in (o.items() if isinstance(o, dict) else [(o, {})])}
        stages[name] = {"upstream": sorted(nx.ancestors(graph, name)), "outs": list(outs),
                        "metrics": [p for p, (kind, _) in outs.items() if kind == "metrics"],
                        "uncached": [p for p, (_, flags) in outs.items() if flags.get("cache") is False],
                        "reports": [p for p in outs if p.endswith(".md")]}
    return stages


def experiment_exists(root: Path, name: str) -> bool:
    """Whether this commit has a DVC experiment `name`: DVC keeps each as the git ref
    refs/exps/<commit[:2]>/<commit[2:]>/<name> (`dvc exp list` would wait for DVC's lock)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "HEAD")
    return bool(head and git("for-each-ref", f"refs/exps/{head[:2]}/{head[2:]}/{name}"))


def plan(stages: dict[str, dict], targets: list[str]) -> list[str]:
    """The stages to run for `targets` (all when empty): the targets and everything upstream, in DAG order."""
    unknown = [t for t in targets if t not in stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {list(stages)}")
    wanted = set(targets).union(*(stages[t]["upstream"] for t in targets)) if targets else set(stages)
    return [s for s in stages if s in wanted]


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """{'sft.adapter.method': 'lora'} -> ['sft.adapter.method=lora'] (the `dvc exp run -S` syntax)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


@contextlib.contextmanager
def overridden_params(root: Path, overrides: dict[str, Any], logger) -> Iterator[str]:
    """params.yaml with the overrides written in as `dvc exp run -S` writes them (comments kept, unknown keys refused);
    put back afterwards unless something else changed it meanwhile. Yields the text the run uses.

    DVC has no public call that applies `-S` without running (`dvc exp run --dry -S` puts the file back), so this
    is the function `dvc exp run` calls."""
    from dvc.utils.hydra import apply_overrides

    path = root / "params.yaml"
    original = path.read_text()
    try:
        if overrides:
            apply_overrides(str(path), set_param_args(overrides))
    except Exception as e:  # DVC wraps the grammar's error; its cause names the key
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ValueError(f"overrides {set_param_args(overrides)} rejected: {e}{cause}") from e
    applied = path.read_text()
    try:
        yield applied
    finally:
        if applied != original and path.read_text() == applied:
            path.write_text(original)
            logger.info("params.yaml restored; `dvc exp apply <experiment>` brings this run's params and outputs back")
