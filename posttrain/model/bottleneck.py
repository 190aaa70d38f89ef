"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): `adapter.method: bottleneck`.

A small module after a decoder layer's sublayer output, before its residual add:

    out = sub(x);  out = out + up(act(down(out)))      down: hidden -> hidden / reduction_factor, up: back

`placement: houlsby` puts one after the attention and one after the MLP of every decoder layer, `pfeiffer`
after the MLP only. `up` starts at zero, so the model starts unchanged; only the adapters train.
Trainable parameters per insertion: 2 * hidden * width + width + hidden (weights and biases), width =
hidden // reduction_factor (posttrain.train.memory.estimate counts them so).

Why not peft: peft 0.21 has no bottleneck adapter, and its experimental custom-LoRA-layer hook
(`LoraConfig._register_custom_module`) is not written into adapter_config.json (a reader must register the
class again before loading), its config has no field for the nonlinearity or the placement, and its
merge_and_unload would have to be refused for this layer anyway. The AdapterHub `adapters` library pins
transformers ~=4.57. So this is our own module, wired as forward hooks (the model's own parameter names stay
as they are), saved the way a peft adapter is:

    <out_dir>/adapter_config.json              peft_type BOTTLENECK, base_model_name_or_path, the settings
    <out_dir>/bottleneck_adapter.safetensors   layers.<i>.<attn|mlp>.<down|up>.<weight|bias>

posttrain.model.loading.load_model follows the chain as for peft adapters (`is_adapter_dir`, `base_of_adapter`), but
cannot merge: the nonlinearity keeps a bottleneck out of any linear weight. A loaded bottleneck stays as a
frozen module; a later stage may train another bottleneck or a LoRA-family adapter over it, not full/freeze.
Writing such a model as plain weights (export, a reward backbone, align's full-method reference folder) is
refused with BottleneckNotMergeable instead of writing a folder transformers would load without the adapter.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from torch import nn

from posttrain.core.config import StageError

PEFT_TYPE = "BOTTLENECK"
WEIGHTS = "bottleneck_adapter.safetensors"
CONFIG = "adapter_config.json"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
SUBLAYERS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
MODULE_OF = {"attn": "self_attn", "mlp": "mlp"}


class BottleneckNotMergeable(StageError):
    """A model carrying a bottleneck adapter was asked for plain weights."""

    label = "bottleneck adapter"


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, width: int, nonlinearity: str):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def width_of(hidden: int, reduction_factor: int) -> int:
    if reduction_factor < 1:
        raise StageError(f"adapter.reduction_factor={reduction_factor} must be >= 1")
    return max(1, hidden // reduction_factor)


def params_per_insertion(hidden: int, reduction_factor: int) -> int:
    w = width_of(hidden, reduction_factor)
    return 2 * hidden * w + w + hidden


def insertions(layers: int, placement: str) -> int:
    return layers * len(SUBLAYERS[placement])


def _hook(module, args, output):
    """Forward hook on a sublayer: its output through each bottleneck it carries (attention returns a tuple)."""
    if isinstance(output, tuple):
        h = output[0]
        for b in module.bottlenecks:
            h = b(h)
        return (h, *output[1:])
    for b in module.bottlenecks:
        output = b(output)
    return output


def decoder_layers(model):
    for m in (model, getattr(model, "model", None), getattr(getattr(model, "model", None), "model", None)):
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise StageError(f"adapter.method=bottleneck: cannot find the decoder layers of {type(model).__name__} "
                     "(expected model.model.layers with self_attn and mlp, as in Llama-style models)")


def carries(model) -> bool:
    """Whether `model` (or the model a peft wrapper holds) carries bottleneck adapters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "bottleneck_adapters", None))


def attach(model, settings: dict, trainable: bool) -> list[Bottleneck]:
    """Add one bottleneck per insertion point to `model` (after any it carries already); return them in save
    order. `settings`: reduction_factor, placement, nonlinearity (+ base_model_name_or_path when loaded)."""
    hidden = model.config.get_text_config().hidden_size
    width = width_of(hidden, settings["reduction_factor"])
    added = []
    for layer in decoder_layers(model):
        for where in SUBLAYERS[settings["placement"]]:
            sub = getattr(layer, MODULE_OF[where])
            if not hasattr(sub, "bottlenecks"):
                sub.bottlenecks = nn.ModuleList()
                sub.register_forward_hook(_hook)
            ref = next(sub.parameters())
            b = Bottleneck(hidden, width, settings["nonlinearity"]).to(device=ref.device, dtype=ref.dtype)
            b.requires_grad_(trainable)
            sub.bottlenecks.append(b)
            added.append(b)
    if not hasattr(model, "bottleneck_adapters"):
        model.bottleneck_adapters = []
        model.save_pretrained = types.MethodType(_save_pretrained, model)
    model.bottleneck_adapters.append({**settings, "hidden_size": hidden, "width": width, "trainable": trainable})
    return added


def _keys(model, index: int) -> dict[str, str]:
    """Full parameter name in `model` -> name in the adapter file, for adapter number `index`."""
    placement = model.bottleneck_adapters[index]["placement"]
    prefix = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    names = {}
    for name, module in model.named_modules():
        if id(module) in prefix:
            for where in SUBLAYERS[placement]:
                sub = getattr(module, MODULE_OF[where])
                slot = sum(1 for a in model.bottleneck_adapters[:index] if where in SUBLAYERS[a["placement"]])
                for pname, _ in sub.bottlenecks[slot].named_parameters():
                    names[f"{name}.{MODULE_OF[where]}.bottlenecks.{slot}.{pname}"] = \
                        f"layers.{prefix[id(module)]}.{where}.{pname}"
    return names


# ---------------------------------------------------------------- training, saving, loading


def make_trainable(model, adapter, head: str | None = None):
    """method=bottleneck: everything frozen, one new bottleneck per insertion point, which trains."""
    if head is not None:
        raise StageError("adapter.method=bottleneck is not supported for a reward/judge model (its score head would "
                         "have to be saved with the adapter, and the reward-model loader reads peft adapters only): "
                         "use lora / dora / ia3 or full for this stage")
    for p in model.parameters():
        p.requires_grad = False
    attach(model, {"reduction_factor": adapter.reduction_factor, "placement": adapter.placement,
                   "nonlinearity": adapter.nonlinearity}, trainable=True)
    return model


def point_at(model, base: str) -> None:
    """The adapter being trained names `base` (what posttrain.model.loading._point_adapter_at computes) as its base."""
    model.bottleneck_adapters[-1]["base_model_name_or_path"] = base


def _save_pretrained(self, save_directory, state_dict=None, is_main_process=True, **kwargs):
    """save_pretrained of a model carrying bottlenecks: the one being trained, as an adapter folder; anything
    else (plain weights with unmergeable adapters in them) is refused."""
    settings = self.bottleneck_adapters[-1]
    if not settings["trainable"]:
        raise BottleneckNotMergeable(
            "this model carries a bottleneck adapter, which cannot be merged into plain weights (its nonlinearity "
            "sits between two projections), and a Hugging Face folder that loads it with transformers alone would "
            "need custom modelling code (trust_remote_code), which this pipeline does not ship. The adapter folder "
            "(base + bottleneck_adapter.safetensors) loads with posttrain.model.loading.load_model (evaluate, "
            "generate, serve --model through posttrain); to export plain weights, train the last stage with lora / "
            "dora / ia3 / full instead (docs/peft-search.md)")
    if not is_main_process:
        return
    from safetensors.torch import save_file

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    keys = _keys(self, len(self.bottleneck_adapters) - 1)
    params = dict(self.named_parameters())
    full = {k: (state_dict[k] if state_dict is not None and k in state_dict else params[k]).detach().contiguous().cpu()
            for k in keys}
    save_file({keys[k]: v for k, v in full.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    meta = {k: v for k, v in settings.items() if k != "trainable"}
    meta.setdefault("base_model_name_or_path", self.config._name_or_path)
    (out / CONFIG).write_text(json.dumps({"peft_type": PEFT_TYPE, **meta}, indent=2) + "\n")
    if out.name.startswith("checkpoint-"):  # the Trainer resumes a non-peft model from model.safetensors (non-strict)
        save_file(full, str(out / "model.safetensors"), metadata={"format": "pt"})


def is_bottleneck_dir(path: str | Path) -> bool:
    f = Path(path) / CONFIG
    return f.is_file() and json.loads(f.read_text()).get("peft_type") == PEFT_TYPE


def load(model, adapter_dir: str | Path):
    """`model` with the bottleneck adapter saved in `adapter_dir` attached (frozen)."""
    from safetensors.torch import load_file

    settings = json.loads((Path(adapter_dir) / CONFIG).read_text())
    settings = {k: settings[k] for k in ("reduction_factor", "placement", "nonlinearity", "base_model_name_or_path")}
    attach(model, settings, trainable=False)
    keys = _keys(model, len(model.bottleneck_adapters) - 1)
    tensors = load_file(str(Path(adapter_dir) / WEIGHTS))
    if set(tensors) != set(keys.values()):
        raise StageError(f"{adapter_dir}/{WEIGHTS} does not match its adapter_config.json on this base model "
                         f"({len(tensors)} tensors, {len(keys)} expected)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for full, short in keys.items():
            params[full].copy_(tensors[short])
    return model
