"""A causal LM as one ONNX graph with its key/value cache, and greedy generation from it in onnxruntime.

`export_onnx` traces a Hugging Face folder with transformers' own exporter (`transformers.exporters.OnnxExporter`,
torch.onnx's dynamo path): the model's multi-token decode step, captured from a real `generate()` on a few
left-padded chat prompts, becomes `model.onnx` (+ `model.onnx.data`, the fp32 weights). Its inputs are
`input_ids`, `attention_mask`, `position_ids` and the cache (`past_key_values.layers.<i>.keys/values`), its outputs
the logits and the grown cache; every axis that varies (batch, new tokens, cache length) stays dynamic, so the one
graph reads the prompt (on an empty cache) and then each new token (on the cache it returned). The folder also
holds the config, generation config and tokenizer: it serves on its own.

`OnnxCausalLM` runs that folder in onnxruntime and generates greedily the way `model.generate` does (left padding,
position ids from the attention mask, stop at eos, pad after it, `min_new_tokens`), and `greedy_agreement` compares
its answers with the torch model's.

optimum's `ORTModelForCausalLM` (the `text-generation-with-past` task) is not used: every optimum-onnx release
(0.1.0 the newest) requires transformers<4.58 and fails at import on transformers 5 (docs/onnx.md).
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import torch

from posttrain.export.registry import ExportError

ONNX_FILE = "model.onnx"  # with model.onnx.data (the weights), export.json (the trace's metadata), config.json
_CACHE_INPUT = re.compile(r"^input\.past_key_values\.layers\.(\d+)\.(keys|values)$")


def _chat(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def export_onnx(model_dir: str | Path, out_dir: str | Path, prompts: list[str], opset: int | None = None,
                optimize: bool = True) -> dict:
    """Trace the model in `model_dir` (a Hugging Face folder) into `out_dir`; returns seconds, opset and bytes.

    `prompts` (two or more, of different token lengths) are the trace's sample: a batch of one would fix the graph's
    batch axis to 1, and a batch with no left padding traces a graph that leaves the attention mask out (it then
    reads padded batches wrong: 1 of 4 prompts right on the tiny model), so both are refused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_for_generation

    from posttrain.evaluation.chat import encode_prompts

    if len(prompts) < 2:
        raise ValueError(f"the trace needs at least 2 prompts (got {len(prompts)}): with one the graph's batch is 1")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = encode_prompts(tokenizer, _chat(prompts), model.device)
    if bool(enc["attention_mask"].all()):
        raise ValueError("the trace's prompts must differ in token length: a sample with no left padding traces a "
                         "graph that leaves the attention mask out")
    greedy = GenerationConfig(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # One decode step of two tokens (two generate steps merged): its query axis stays dynamic, so the same graph
    # also reads a whole prompt on an empty cache, and no second copy of the weights is needed for a prefill graph.
    decode, sample = decompose_for_generation(model, dict(enc), generation_config=greedy, multi_token_decode=True)["decode"]
    exported = OnnxExporter().export(decode, sample, OnnxConfig(dynamic=True, opset_version=opset, optimize=optimize))
    out = Path(out_dir)
    exported.generation_config = model.generation_config
    exported.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"seconds": time.perf_counter() - start, "opset": graph_opset(out / ONNX_FILE), "bytes": folder_bytes(out)}


def graph_opset(path: str | Path) -> int:
    """The default-domain opset the graph was written for."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _size(axis, default: int) -> int:
    """A graph input's axis as a number: an int, a name that is one ("2"), else `default`."""
    return int(axis) if isinstance(axis, int) or str(axis).isdigit() else default


class OnnxCausalLM:
    """A folder written by `export_onnx`, run by onnxruntime on the CPU."""

    def __init__(self, path: str | Path, num_threads: int | None = None):
        import onnxruntime as ort
        from transformers.exporters import ExportedModel

        options = ort.SessionOptions()
        if num_threads:  # onnxruntime otherwise sizes its pool from every core of the machine
            options.intra_op_num_threads = num_threads
        self.exported = ExportedModel.from_pretrained(str(path), device="cpu", session_options=options)
        self.runner = self.exported.runners["model"]
        self.config, self.generation_config = self.exported.config, self.exported.generation_config
        self.dtype = self.runner.dtype
        c = self.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        layers: dict[int, tuple[int, int]] = {}
        for spec in self.runner.session.get_inputs():
            m = _CACHE_INPUT.match(spec.name)
            if m:  # [batch, kv heads, cache length, head dim]: the graph names the fixed axes by their size
                layers[int(m.group(1))] = (_size(spec.shape[1], heads), _size(spec.shape[3], dim))
        self.cache_shapes = [layers[i] for i in sorted(layers)]

    def empty_cache(self, batch: int):
        """The cache before the prompt: every layer's keys and values of length 0."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (heads, dim) in enumerate(self.cache_shapes):
            empty = torch.zeros(batch, heads, 0, dim, dtype=self.dtype)
            cache.update(empty, empty.clone(), i)
        return cache

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values=None):
        """One forward: logits for `input_ids` and the cache grown by them (`CausalLMOutputWithPast`)."""
        cache = self.empty_cache(input_ids.shape[0]) if past_key_values is None else past_key_values
        return self.runner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of a left-padded batch: prompt + new tokens, as `model.generate` returns them.

        eos and pad default to the saved generation config's, as in transformers; a finished row is padded."""
        gen = self.generation_config
        eos = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else getattr(gen, "pad_token_id", None)
        pad = pad if pad is not None else (eos[0] if eos else 0)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self(input_ids, mask, positions)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        stop = torch.tensor(eos, dtype=torch.long)
        new = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if step < min_new_tokens and eos:
                logits[:, stop] = float("-inf")
            token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
            new.append(token)
            done |= torch.isin(token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            positions = positions[:, -1:] + 1
            out = self(token[:, None], mask, positions, out.past_key_values)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids


@torch.no_grad()
def greedy_agreement(model, onnx_model: OnnxCausalLM, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """Greedy answers of the torch model and the ONNX one to each prompt, alone and all in one left-padded batch.

    Returns the prompt count, how many got the same tokens both ways, and the largest logit difference on the
    batched prompts' first forward."""
    from posttrain.evaluation.chat import encode_prompts

    def both(chats):
        enc = encode_prompts(tokenizer, chats, "cpu")
        kw = {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
        ours = model.generate(**enc, do_sample=False, **kw)
        theirs = onnx_model.generate(enc["input_ids"], enc["attention_mask"], **kw)
        n = enc["input_ids"].shape[1]
        return [a == b for a, b in zip(ours[:, n:].tolist(), theirs[:, n:].tolist())]

    model.eval()
    chats = _chat(prompts)
    alone = [both([c])[0] for c in chats]
    batched = both(chats)
    enc = encode_prompts(tokenizer, chats, "cpu")
    mask = enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions).logits
    got = onnx_model(enc["input_ids"], mask, positions).logits
    real = mask.bool()  # padded positions' logits are not used by anything
    diff = (ref - got).abs()[real].max().item()
    return {"prompts": len(prompts), "equal": sum(a and b for a, b in zip(alone, batched)), "max_logit_diff": diff}


# ---------------------------------------------------------------- the export stage's ONNX copy


def check_onnx_config(onnx) -> None:
    """export.onnx's settings, checked before anything is written."""
    d = Path(onnx.dir)
    if d.is_absolute() or ".." in d.parts or d.parts in ((), (".",)):
        raise ExportError(f"export.onnx.dir '{onnx.dir}' must be a folder name inside export.out_dir")
    if len(onnx.check_prompts) < 2:
        raise ExportError("export.onnx.check_prompts needs at least 2 prompts: they are the trace's sample batch, "
                          "and a batch of 1 would fix the graph's batch to 1")
    if onnx.check_new_tokens < 1:
        raise ExportError(f"export.onnx.check_new_tokens must be at least 1, got {onnx.check_new_tokens}")
    missing = [p for p in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"export.onnx.enabled needs {', '.join(missing)}: pip install -e . (pyproject pins them)")


def write_onnx(o, source: str, out_dir: str, folder: Path, model, tokenizer) -> dict:
    """Trace the merged folder just written into `folder/onnx.dir` and check onnxruntime's greedy tokens against
    torch's; the metrics, or an ExportError (the caller's atomic folder is then thrown away)."""
    try:
        info = export_onnx(folder, folder / o.dir, o.check_prompts, opset=o.opset, optimize=o.optimize)
        onnx_model = OnnxCausalLM(folder / o.dir, num_threads=torch.get_num_threads())
        check = greedy_agreement(model, onnx_model, tokenizer, o.check_prompts, o.check_new_tokens)
    except Exception as e:
        raise ExportError(f"export.onnx: exporting {source} to ONNX failed, nothing was written "
                          f"(export.onnx.enabled: false exports without it): {type(e).__name__}: {e}") from e
    n, k = check["prompts"], check["equal"]
    if o.require_equal and k < n:
        raise ExportError(f"export.onnx: onnxruntime's greedy tokens differ from torch's on {n - k} of {n} "
                          f"export.onnx.check_prompts (largest logit difference {check['max_logit_diff']:.2e}); "
                          "nothing was written (export.onnx.require_equal: false ships it anyway)")
    return {"onnx_dir": str(Path(out_dir) / o.dir), "onnx_opset": info["opset"],
            "onnx_mb": round(info["bytes"] / 2**20, 3), "onnx_export_s": round(info["seconds"], 1),
            "onnx_greedy_equal": k == n, "onnx_equal_prompts": k, "onnx_check_prompts": n,
            "onnx_max_logit_diff": check["max_logit_diff"]}
