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

from posttrain.core.config import YAML_LOADER, ConfigError, StageError

NEWLINE = b"\n"
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout; stages run from the cwd (DVC: the project root)


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
    """The rows of a JSONL file a stage reads (most are another stage's output). A missing file names the stage
    that makes it; a folder, text that is not UTF-8 or a line that is not JSON is an InputError naming file and line."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path}: is a folder, expected a .jsonl file")
    if not p.is_file():
        raise missing_input(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} line {raw[:e.start].count(NEWLINE) + 1}: not UTF-8 text; {remake(path)}")
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno}); {remake(path)}")
    return rows


# ---------------------------------------------------------------- inputs another stage makes


class InputError(StageError):
    """A stage's input file exists but cannot be read as what it should hold."""

    label = "data error"


class MissingInput(StageError, FileNotFoundError):
    """A stage's input does not exist yet (still a FileNotFoundError for code that expects one)."""

    label = "missing input"


def producer(path: str | Path, dvc_file: str | Path | None = None) -> str | None:
    """The dvc.yaml stage whose outs hold `path` (the working directory's dvc.yaml, else the checkout's), or None."""
    import yaml

    if dvc_file is None:
        dvc_file = "dvc.yaml" if Path("dvc.yaml").is_file() else REPO_ROOT / "dvc.yaml"
    try:
        stages = (yaml.load(Path(dvc_file).read_text(), Loader=YAML_LOADER) or {}).get("stages") or {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return None
    target = Path(path).resolve()
    for name, stage in stages.items():
        for out in (stage or {}).get("outs") or []:
            out = next(iter(out)) if isinstance(out, dict) else out
            if isinstance(out, str) and "${" not in out:
                out_path = Path(out).resolve()
                if target == out_path or out_path in target.parents:
                    return name
    return None


def remake(path: str | Path) -> str:
    """What to run so `path` is (re)made: its stage, where dvc.yaml names one."""
    stage = producer(path)
    return f"run `python -m stages.{stage}` (or `dvc repro {stage}`) to make it" if stage else "check the path in params.yaml"


def missing_input(path: str | Path, key: str | None = None) -> MissingInput:
    where = f"[{key}] " if key else ""
    return MissingInput(f"{where}{path} does not exist: {remake(path)}")


# ---------------------------------------------------------------- provenance


def digest(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.exists():
        raise missing_input(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise MissingInput(f"{path} is an empty folder: {remake(path)}")
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
    if Path(path).is_dir():
        raise ConfigError(f"[{key}] {path} is a folder: set {key} to a .jsonl file")
    if not Path(path).is_file():
        made = producer(path)
        hint = f"run `python -m stages.{made}` first, or {hint}" if made and not Path(path).exists() else hint
        raise ConfigError(f"[{key}] {path} does not exist: {hint}")
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"[{key}] {path} has no rows: {hint}")
    return rows


# ---------------------------------------------------------------- model folders

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_model_folder(folder: str | Path, key: str, tokenizer: bool = True) -> None:
    """A ConfigError naming `key` and what is wrong unless `folder` holds a loadable Hugging Face model: a
    config.json, complete safetensors weights (every shard an index names, each with a whole header and data)
    and, with `tokenizer`, a tokenizer file. Cheap: reads headers only."""
    folder = Path(folder)
    need = "a model folder holds config.json, *.safetensors weights and a tokenizer (tokenizer.json)"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"[{key}] {folder}: no config.json, so not a Hugging Face model folder ({need})")
    try:
        json.loads((folder / "config.json").read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"[{key}] {folder / 'config.json'}: not valid JSON ({e}); re-save or re-download the model")
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"[{key}] {index}: not a safetensors index ({e}); re-download the model")
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise ConfigError(f"[{key}] {folder}: {SAFETENSORS_INDEX} names shard(s) that are missing: "
                              f"{', '.join(absent)}; download every shard")
        weights = [folder / s for s in shards]
    if not weights:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5"))
        why = (f"only {', '.join(other)}: this pipeline loads safetensors only (re-save the model with "
               f"save_pretrained(..., safe_serialization=True))" if other else "no *.safetensors weights")
        raise ConfigError(f"[{key}] {folder}: {why}; {need}")
    for w in weights:
        problem = safetensors_problem(w)
        if problem:
            raise ConfigError(f"[{key}] {w}: {problem}; re-download or re-save the model")
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"[{key}] {folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                          f"tokenizer into the folder (tokenizer.save_pretrained) or download it with the model")


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole safetensors file (truncated, corrupt header), or None: reads the header only."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated safetensors file ({size} bytes, less than its 8-byte header length)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"truncated or corrupt safetensors file (header of {n} bytes, file of {size})"
        try:
            header = json.loads(f.read(n))
            ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError):
            return "corrupt safetensors file (its header is not valid JSON tensor metadata)"
    data = size - 8 - n
    if ends and max(ends) > data:
        return f"truncated safetensors file (tensors need {max(ends)} bytes of data, it has {data})"
    return None
