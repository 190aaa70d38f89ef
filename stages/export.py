"""export: the final model as a plain Hugging Face folder with a model card, registered in MLflow.

Loads `export.model` (adapter chains are merged by posttrain.models.load_model) and writes to `out_dir`:
safetensors weights, config, generation config, tokenizer with its chat template, and README.md, a
Hugging Face model card with the lineage (stage by stage, back to the base model), digests of the data,
every stage's params from params.yaml and the evaluate table. The same model is logged with MLflow's
transformers flavour and registered as a new version of `registry.name`; `registry.alias` moves to it
and the version is tagged with the git commit and the hash of dvc.lock (the upstream stages' entries).
With `onnx.enabled`, the folder also holds `onnx.dir`: the merged model traced into one ONNX graph with its
key/value cache (posttrain.onnx_export), whose greedy answers onnxruntime must give token for token as torch does on
`onnx.check_prompts`; its size and that check go into the metrics. It is written before the registry is touched,
so a failed export or check stops the stage with nothing written and no new version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.cli import run_stage
from posttrain.config import StageError, TrackingConfig, read_params
from posttrain.files import atomic_dir, digest, git_commit, write_json
from posttrain.models import is_adapter_dir, load_model, load_tokenizer
from posttrain.runtime import set_seed
from posttrain.tracking import lifecycle_id, log_stage_metrics, stage_run

RUNTIME_PACKAGES = ("transformers", "torch", "tokenizers", "accelerate", "safetensors")


class ExportError(StageError):
    """The export stage cannot start; nothing was written."""

    label = "export"


@dataclass(frozen=True)
class ExportConfig:
    seed: int
    tracking: TrackingConfig
    model: str  # the stage output that ships (merged if it is an adapter)
    params_file: str  # the params whose every section the card lists (this file)
    data_dirs: list[str]  # digested file by file into the card
    evaluate_metrics: str  # metrics/evaluate.json: the table in the card
    max_new_tokens: int  # default generation length of the served model
    card: CardConfig
    registry: RegistryConfig
    onnx: OnnxExportConfig
    out_dir: str


@dataclass(frozen=True)
class CardConfig:
    license: str
    language: list[str]
    tags: list[str]


@dataclass(frozen=True)
class RegistryConfig:
    name: str  # registered model name in MLflow; each export adds a version
    alias: str  # moved to the new version (e.g. candidate)


@dataclass(frozen=True)
class OnnxExportConfig:
    enabled: bool  # also write an ONNX copy for onnxruntime
    dir: str  # inside out_dir, so DVC versions it with the folder
    opset: int | None  # None: the newest opset onnxscript writes
    optimize: bool  # onnxscript's optimisation passes after the trace
    check_prompts: list[str]  # the trace's sample batch (2+, of different token lengths) and the torch-vs-ORT check
    check_new_tokens: int
    require_equal: bool  # stop unless every prompt's greedy tokens are equal


# ---------------------------------------------------------------- lineage


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


def data_digests(dirs: list[str]) -> dict[str, str]:
    files = {}
    for d in dirs:
        p = Path(d)
        if not p.exists():
            raise ExportError(f"export.data_dirs: {d} does not exist (run prepare first)")
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


# ---------------------------------------------------------------- card


def _table(rows: dict[str, dict], highlight: str | None) -> list[str]:
    cols = list(next(iter(rows.values())).keys())
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        label = f"**{name}** (this model)" if name == highlight else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def model_card(cfg: ExportConfig, params: dict, chain: list[dict], table: dict, row: str | None,
               digests: dict[str, str], provenance: dict[str, str], n_params: int):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base_id = base_model_id(chain, params)
    evals = []
    if row is not None:
        scores = table[row]
        for metric, kind in (("instruction_em", "exact_match"), ("cot_accuracy", "accuracy"),
                             ("refusal_rate", "refusal_rate"), ("perplexity", "perplexity")):
            if metric in scores:
                evals.append(EvalResult(task_type="text-generation", dataset_type="local",
                                        dataset_name="llm-lifecycle held-out suites (stages/evaluate.py)",
                                        metric_type=kind, metric_name=metric, metric_value=scores[metric]))
    data = ModelCardData(
        language=cfg.card.language, license=cfg.card.license, library_name="transformers",
        pipeline_tag="text-generation", tags=cfg.card.tags, base_model=base_id,
        model_name=cfg.registry.name, eval_results=evals or None,
    )
    name = cfg.registry.name
    lines = [
        f"# {name}", "",
        f"A {n_params:,}-parameter causal language model made by the llm-lifecycle pipeline "
        f"(`dvc repro`): `{cfg.model}` with every adapter merged. "
        f"Registered in MLflow as `models:/{name}@{cfg.registry.alias}`.", "",
        "## Lineage", "",
        "| stage | output | from | method | also uses |", "|---|---|---|---|---|",
        *[f"| {s['stage']} | `{s['output']}` | `{s['from']}` | {s['method']} | {', '.join(s['also_uses'])} |"
          for s in chain],
        "",
        f"Base model: `{base_id}`" if base_id else
        "Base model: the embedded tiny Llama built from `base.tiny` with a tokenizer trained on the prepared data.",
        "",
        "## Evaluation", "",
        f"From `{cfg.evaluate_metrics}` (every model of the lineage on the same held-out suites):", "",
        *(_table(table, row) if table else ["(no evaluate table)"]),
        "",
        *([] if row else [f"`{cfg.model}` has no row in the evaluate table.", ""]),
        "## Data", "",
        "| file | sha256 |", "|---|---|",
        *[f"| `{f}` | `{h}` |" for f, h in digests.items()],
        "",
        "## Provenance", "",
        *[f"- {k}: `{v}`" for k, v in provenance.items()],
        "",
        "## Use", "",
        "```bash",
        f'python -m posttrain.generate --model {cfg.out_dir} "Count the words.\\n\\nblue fox gold"',
        f"mlflow models serve -m models:/{name}@{cfg.registry.alias} --env-manager local -p 5001",
        "```", "",
        *([(f"`{cfg.onnx.dir}/` holds the same model as one ONNX graph with its key/value cache (`model.onnx`, "
            "fp32 weights in `model.onnx.data`) for onnxruntime, with its tokenizer; "
            "`posttrain.onnx_export.OnnxCausalLM` generates from it (docs/onnx.md)."), ""] if cfg.onnx.enabled else []),
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{cfg.out_dir}")',
        f'model = AutoModelForCausalLM.from_pretrained("{cfg.out_dir}")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Sort the numbers.\\n\\n3 1 2"}],',
        '                              add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        f"print(tok.decode(model.generate(**ids, max_new_tokens={cfg.max_new_tokens})[0, ids['input_ids'].shape[1]:],"
        " skip_special_tokens=True))",
        "```", "",
        "## Parameters of every stage (params.yaml)", "",
    ]
    for section, value in params.items():
        lines += [f"### {section}", "", "```yaml", yaml.safe_dump({section: value}, sort_keys=False).rstrip(), "```", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------- registry


def prompt_template(tokenizer) -> str:
    """The chat template rendered around one user turn, as MLflow's `{prompt}` template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\0"}], tokenize=False, add_generation_prompt=True)
    return text.replace("{", "{{").replace("}", "}}").replace("\0", "{prompt}")


def register(cfg: ExportConfig, model, tokenizer, card, tags: dict[str, str]) -> str:
    """Log the model with the transformers flavour, register a new version, move the alias, tag it."""
    import mlflow
    from mlflow.models import infer_signature

    # Explicit requirements: MLflow would otherwise import torchvision (not installed) to pin it,
    # and load the model in a subprocess to infer the rest.
    reqs = [f"{p}=={importlib.metadata.version(p)}" for p in RUNTIME_PACKAGES]
    signature = infer_signature(["prompt"], ["answer"], params={"max_new_tokens": cfg.max_new_tokens})
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
        registered_model_name=cfg.registry.name, model_card=card, pip_requirements=reqs,
        prompt_template=prompt_template(tokenizer), signature=signature,
        model_config={"max_new_tokens": cfg.max_new_tokens, "return_full_text": False},
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(cfg.registry.name, cfg.registry.alias, version)
    for k, v in tags.items():
        client.set_model_version_tag(cfg.registry.name, version, k, v)
    return version


# ---------------------------------------------------------------- stage


def check_inputs(cfg: ExportConfig) -> None:
    if not Path(cfg.model).exists():
        raise ExportError(f"export.model '{cfg.model}' does not exist: run the stage that writes it first")
    if not Path(cfg.evaluate_metrics).exists():
        raise ExportError(f"export.evaluate_metrics '{cfg.evaluate_metrics}' does not exist: run evaluate first")
    if cfg.onnx.enabled:
        check_onnx_inputs(cfg.onnx)


def check_onnx_inputs(onnx: OnnxExportConfig) -> None:
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


def write_onnx(cfg: ExportConfig, folder: Path, model, tokenizer) -> dict:
    """Trace the merged folder just written into `folder/onnx.dir` and check onnxruntime's greedy tokens against
    torch's; the metrics, or an ExportError (the caller's atomic folder is then thrown away)."""
    import torch

    from posttrain.onnx_export import OnnxCausalLM, export_onnx, greedy_agreement

    o = cfg.onnx
    try:
        info = export_onnx(folder, folder / o.dir, o.check_prompts, opset=o.opset, optimize=o.optimize)
        onnx_model = OnnxCausalLM(folder / o.dir, num_threads=torch.get_num_threads())
        check = greedy_agreement(model, onnx_model, tokenizer, o.check_prompts, o.check_new_tokens)
    except Exception as e:
        raise ExportError(f"export.onnx: exporting {cfg.model} to ONNX failed, nothing was written "
                          f"(export.onnx.enabled: false exports without it): {type(e).__name__}: {e}") from e
    n, k = check["prompts"], check["equal"]
    if o.require_equal and k < n:
        raise ExportError(f"export.onnx: onnxruntime's greedy tokens differ from torch's on {n - k} of {n} "
                          f"export.onnx.check_prompts (largest logit difference {check['max_logit_diff']:.2e}); "
                          "nothing was written (export.onnx.require_equal: false ships it anyway)")
    return {"onnx_dir": str(Path(cfg.out_dir) / o.dir), "onnx_opset": info["opset"],
            "onnx_mb": round(info["bytes"] / 2**20, 3), "onnx_export_s": round(info["seconds"], 1),
            "onnx_greedy_equal": k == n, "onnx_equal_prompts": k, "onnx_check_prompts": n,
            "onnx_max_logit_diff": check["max_logit_diff"]}


def run(cfg: ExportConfig) -> dict:
    set_seed(cfg.seed)
    check_inputs(cfg)
    params_file = cfg.params_file
    params = read_params(params_file)
    table = json.loads(Path(cfg.evaluate_metrics).read_text())
    row = next((n for n, p in (params.get("evaluate", {}).get("models") or {}).items() if p == cfg.model), None)
    row = row if row in table else None
    chain = lineage(cfg.model, params)
    digests = data_digests(cfg.data_dirs)
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    if hasattr(model, "peft_config"):
        raise ExportError(f"{cfg.model} is a prompt-learning adapter: it has no weights to merge; "
                          "export a full or LoRA-family model")
    if tokenizer.chat_template is None:
        raise ExportError(f"{cfg.model}: the tokenizer has no chat template")
    lock_hash, lock = dvc_lock_hash()
    out_md5 = next((o.get("md5", "") for st in lock.values() for o in st.get("outs", []) if o.get("path") == cfg.model), "")
    n_params = sum(p.numel() for p in model.parameters())
    provenance = {
        "git_commit": git_commit(), "dvc_lock_sha256": lock_hash, "source_model": cfg.model,
        "source_md5 (dvc.lock)": out_md5 or "none", "params_sha256": digest(params_file),
        "lifecycle": lifecycle_id(params_file), "merged_adapters": str(is_adapter_dir(cfg.model)).lower(),
    }
    card = model_card(cfg, params, chain, table, row, digests, provenance, n_params)
    tags = {"git_commit": provenance["git_commit"], "dvc_lock_sha256": lock_hash, "source_model": cfg.model,
            "source_md5": out_md5 or "none", "lifecycle": provenance["lifecycle"],
            "lineage": " <- ".join(s["stage"] for s in chain)}
    with stage_run("export", cfg, inputs={"model": cfg.model, "evaluate": cfg.evaluate_metrics}):
        with atomic_dir(cfg.out_dir) as tmp:
            model.generation_config.eos_token_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
            model.generation_config.pad_token_id = model.generation_config.pad_token_id or tokenizer.pad_token_id
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            card.save(tmp / "README.md")
            onnx_metrics = write_onnx(cfg, tmp, model, tokenizer) if cfg.onnx.enabled else {}
            version = register(cfg, model, tokenizer, card, tags)
        import mlflow

        mlflow.log_artifact(str(Path(cfg.out_dir) / "README.md"))
        metrics = {"registered_model": cfg.registry.name, "version": int(version), "alias": cfg.registry.alias,
                   "params": n_params, "lineage": [s["stage"] for s in chain], **tags, **onnx_metrics}
        log_stage_metrics({"params": n_params, "version": int(version), **onnx_metrics})
    write_json("metrics/export.json", metrics)
    return metrics


if __name__ == "__main__":
    run_stage("export", ExportConfig, run)
