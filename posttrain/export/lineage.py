"""Where a model came from: the chain of stages that made it (from params.yaml), the digests of the data, and the
hash of dvc.lock. export writes them into the model card and the registry's tags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from posttrain.core.config import StageError
from posttrain.core.files import digest


def stage_outputs(params: dict) -> dict[str, str]:
    """out_dir -> section name, for every params section that writes a folder."""
    return {v["out_dir"]: k for k, v in params.items() if isinstance(v, dict) and isinstance(v.get("out_dir"), str)}


def lineage(model: str, params: dict) -> list[dict]:
    """The chain of stages that made `model`, newest first, following each stage's `teacher`/`model` input."""
    outs = stage_outputs(params)
    chain, path, seen = [], model, set()
    while path in outs and path not in seen:
        seen.add(path)
        name = outs[path]
        section = params[name]
        parent = section.get("teacher") or section.get("model") or section.get("source")
        method = section.get("method") or (section.get("adapter") or {}).get("method") or ""
        uses = sorted({v for k, v in section.items() if k != "out_dir" and isinstance(v, str) and v in outs
                       and v != parent})
        chain.append({"stage": name, "output": path, "from": parent, "method": method, "also_uses": uses})
        path = parent
    return chain


def base_model_id(chain: list[dict], params: dict) -> str | None:
    """The Hugging Face id the lineage starts from, or None for the embedded tiny model / local paths."""
    if not chain or chain[-1]["stage"] != "base":
        return None
    source = params["base"].get("source", "")
    return None if source == "tiny" or Path(source).exists() else source


def data_digests(dirs: list[str], key: str = "export.data_dirs") -> dict[str, str]:
    files = {}
    for d in dirs:
        p = Path(d)
        if not p.exists():
            raise StageError(f"{key}: {d} does not exist (run prepare first)")
        for f in sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]:
            files[str(f)] = digest(f)
    return files


def dvc_lock_hash(lock: str | Path = "dvc.lock", exclude: str = "export") -> tuple[str, dict]:
    """sha256 of dvc.lock without this stage's own entry (it changes after export runs), and the lock."""
    p = Path(lock)
    if not p.exists():
        return "none", {}
    data = yaml.safe_load(p.read_text()) or {}
    stages = {k: v for k, v in (data.get("stages") or {}).items() if k != exclude}
    return hashlib.sha256(json.dumps(stages, sort_keys=True).encode()).hexdigest(), stages
