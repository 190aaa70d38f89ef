"""Download the wheels a bare GPU machine lacks to run bench.throughput, into .whl/ (git-ignored).

    .venv/bin/python -m bench.device_wheels                      # for the GPU machine: CPython 3.12, x86-64
    .venv/bin/python -m bench.device_wheels --python 3.11 --dest /tmp/whl311   # the same set for this machine

A GPU machine that cannot reach a package registry (this workplace's lent H100/H200: its image has torch,
numpy, pandas, pyarrow, accelerate, transformers 5.17 and the usual small libraries, but no TRL or datasets)
gets these wheels carried with the working tree and installs them with `pip install --no-index --no-deps
--target`, ahead of the image's own packages on PYTHONPATH (bench/README.md has the command). Versions are
read from this checkout's installed environment, so the GPU runs the set that CI tests: TRL, transformers,
datasets, peft and what they import that such an image may lack or hold at another version. torch and the
numeric stack are not carried: the GPU machine's CUDA build of torch is the point.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What bench.throughput's workers import (measured: every distribution in sys.modules at exit) less what a
# CUDA image keeps at a compatible version (torch, numpy, pandas, pyarrow, the small pure-Python libraries).
CARRY = [
    "trl", "transformers", "tokenizers", "peft", "accelerate", "datasets", "huggingface-hub", "hf-xet",
    "httpx2", "httpcore2", "truststore", "dill", "multiprocess", "fsspec",
    "pydantic", "pydantic-core", "typing-inspection", "annotated-types",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def gpu_extra() -> list[str]:
    """pyproject.toml's `gpu` extra (liger-kernel, pinned there): for `kernels: auto` on our path and stock TRL's
    `use_liger_kernel` row. Not installed in this checkout's environment (no GPU here)."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]


def pinned(names: list[str]) -> list[str]:
    """`name==version` for each distribution, at the version installed in this environment."""
    missing = [name for name in names if not _installed(name)]
    if missing:
        raise SystemExit(f"not installed in this environment: {', '.join(missing)} (run `make install` first)")
    return [f"{name}=={md.version(name)}" for name in names]


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--dest", default=str(REPO / ".whl"))
    args = parser.parse_args()
    requirements = pinned(CARRY) + gpu_extra()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", args.python, "--implementation", "cp", *platforms, "-d", args.dest, *requirements],
        check=True,
    )
    wheels = sorted(Path(args.dest).glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.dest}:")
    for wheel in wheels:
        print(f"  {wheel.name}")


if __name__ == "__main__":
    main()
