"""Helpers every stage shares: atomic outputs, JSONL IO, digests, seeds, devices, git."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout; stages themselves run from the cwd (DVC: the project root)


# ---------------------------------------------------------------- outputs


def is_main_process() -> bool:
    """False in the other ranks of a multi-process launch (accelerate launch / torchrun set RANK).

    Only the main process writes a stage's outputs, metrics and MLflow runs; the others train and exit.
    """
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` in one rename.

    A stage killed inside the block leaves `final` untouched (old or absent), never half written.
    In a non-main rank the block gets a scratch dir that is thrown away: the main process alone writes `final`.
    """
    final = Path(final)
    if not is_main_process():
        with tempfile.TemporaryDirectory(prefix=f"{final.name}.rank{os.environ['RANK']}-") as scratch:
            yield Path(scratch)
        return
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename); only the main process of a multi-process launch writes."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp-" + str(os.getpid()))
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(obj: Any):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- provenance


def digest(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: nothing to digest")
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def git_commit() -> str:
    """HEAD's sha, with '-dirty' when tracked files differ; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def require_rows(path: str | Path, key: str, hint: str) -> list[dict]:
    """The rows of a JSONL input; a missing or empty file is a ConfigError naming the params key and what to do
    (a stage with no data stops before anything is written, never with a traceback)."""
    from posttrain.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"[{key}] {path} does not exist: {hint}")
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"[{key}] {path} has no rows: {hint}")
    return rows
