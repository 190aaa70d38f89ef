"""export: the promoted model as a plain Hugging Face folder with a model card, registered in MLflow.

The promotion gate (`gate`, posttrain.evaluation.gate) reads evaluate's table and per-item outcomes first: a model
ships only when every rule passes (paired tests against the reference, floors, intervals). `model: auto` ships the
best model of `gate.candidates` that passes, by `gate.primary`; a named folder ships only if it passes. When none
passes the stage stops (exit 1) with the failed rules and their figures in reports/export.md, metrics/export.json and
the MLflow run: nothing is written to `out_dir` and the registry alias stays where it was.

The promoted model (adapter chains merged by posttrain.model.loading.load_model) is written to `out_dir`: safetensors
weights, config, generation config, tokenizer with its chat template, and README.md, a Hugging Face model card
(posttrain.export.model_card) with the lineage, the gate's verdict, digests of the data, every stage's params and the
evaluate table. It is logged with MLflow's transformers flavour as a new version of `registry.name`;
`registry.alias` moves to it, tagged with the git commit and the hash of dvc.lock. With `onnx.enabled`, the folder
also holds `onnx.dir`: the merged model as one ONNX graph whose greedy answers onnxruntime must give token for token
as torch does on `onnx.check_prompts`, written before the registry is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.core.cli import run_stage
from posttrain.core.config import TrackingConfig, read_params
from posttrain.core.files import atomic_dir, digest, git_commit, write_json
from posttrain.core.runtime import set_seed
from posttrain.core.tracking import lifecycle_id, log_stage_metrics, stage_run
from posttrain.evaluation.gate import GateConfig, check_config, decide, rule_lines, summary_lines
from posttrain.export.lineage import data_digests, dvc_lock_hash, lineage
from posttrain.export.model_card import model_card
from posttrain.export.onnx_export import check_onnx_config, write_onnx
from posttrain.export.registry import ExportError, alias_version, register
from posttrain.model.loading import is_adapter_dir, load_model, load_tokenizer

AUTO = "auto"


@dataclass(frozen=True)
class ExportConfig:
    seed: int
    tracking: TrackingConfig
    model: str  # auto: the best model of gate.candidates that passes the gate | a folder of evaluate.models
    gate: GateConfig  # what a model must show in evaluate's results to ship (posttrain.evaluation.gate)
    params_file: str  # the params whose every section the card lists (this file)
    data_dirs: list[str]  # digested file by file into the card
    evaluate_metrics: str  # metrics/evaluate.json: the table the gate reads and the card shows
    evaluate_items: str  # evaluate's per-item outcomes: the gate's paired tests
    report: str  # the gate's verdict on every candidate, passed or not
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


# ---------------------------------------------------------------- stage


def check_inputs(cfg: ExportConfig) -> None:
    if cfg.model != AUTO and not Path(cfg.model).exists():
        raise ExportError(f"export.model '{cfg.model}' does not exist: run the stage that writes it first")
    for key, path in (("evaluate_metrics", cfg.evaluate_metrics), ("evaluate_items", cfg.evaluate_items)):
        if not Path(path).exists():
            raise ExportError(f"export.{key} '{path}' does not exist: run evaluate first")
    if cfg.onnx.enabled:
        check_onnx_config(cfg.onnx)


def candidates(cfg: ExportConfig, models: dict[str, str]) -> list[str]:
    """The evaluate.models names the gate judges: gate.candidates for auto, else the one whose folder is export.model."""
    check_config(cfg.gate, list(models))
    if cfg.model == AUTO:
        return list(cfg.gate.candidates)
    named = [n for n, p in models.items() if p == cfg.model]
    if not named:
        raise ExportError(f"export.model '{cfg.model}' is not one of evaluate.models, so the gate has no figures "
                          f"for it: add it there (and run evaluate) or set export.model: auto")
    return named[:1]


def gate(cfg: ExportConfig, params: dict, table: dict) -> dict:
    """The gate's decision on the candidates, written to the report before anything is exported."""
    evaluate = params.get("evaluate") or {}
    names = candidates(cfg, evaluate.get("models") or {})
    items = json.loads(Path(cfg.evaluate_items).read_text())
    decision = decide(cfg.gate, names, table, items, evaluate.get("reference", cfg.gate.reference))
    decision["path"] = evaluate["models"].get(decision["chosen"]) if decision["chosen"] else None
    Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
    text = ["# Export: the promotion gate", "", *summary_lines(decision), "", "## Every rule", "", *rule_lines(decision)]
    Path(cfg.report).write_text("\n".join(text) + "\n")
    return decision


def refuse(cfg: ExportConfig, decision: dict) -> None:
    """No model passed: say which rules failed with their figures, in the MLflow run, the metrics and the error."""
    import mlflow

    previous = alias_version(cfg.registry.name, cfg.registry.alias)
    failed = {n: m["failed"] for n, m in decision["models"].items()}
    mlflow.set_tags({"promoted": "false", **{f"gate.{n}": "; ".join(f)[:5000] for n, f in failed.items()}})
    mlflow.log_artifact(cfg.report)
    log_stage_metrics({f"gate.{n}.passed": int(m["passed"]) for n, m in decision["models"].items()})
    write_json("metrics/export.json", {"promoted": False, "model": None, "alias": cfg.registry.alias,
                                       "alias_version": previous, "gate": decision})
    why = " | ".join(f"{n}: {'; '.join(f)}" for n, f in failed.items())
    raise ExportError(f"no model passed the promotion gate, nothing promoted (alias {cfg.registry.alias} stays at "
                      f"version {previous}): {why}. Details: {cfg.report}; the rules: params.yaml export.gate")


def run(cfg: ExportConfig) -> dict:
    set_seed(cfg.seed)
    check_inputs(cfg)
    params = read_params(cfg.params_file)
    table = json.loads(Path(cfg.evaluate_metrics).read_text())
    decision = gate(cfg, params, table)
    row, source = decision["chosen"], decision["path"]
    with stage_run("export", cfg, inputs={"evaluate": cfg.evaluate_metrics, "items": cfg.evaluate_items,
                                          **({"model": source} if source else {})}):
        if source is None:
            refuse(cfg, decision)
        chain = lineage(source, params)
        digests = data_digests(cfg.data_dirs)
        model, tokenizer = load_model(source), load_tokenizer(source)
        if hasattr(model, "peft_config"):
            raise ExportError(f"{source} is a prompt-learning adapter: it has no weights to merge; "
                              "export a full or LoRA-family model")
        if tokenizer.chat_template is None:
            raise ExportError(f"{source}: the tokenizer has no chat template")
        lock_hash, lock = dvc_lock_hash()
        out_md5 = next((o.get("md5", "") for st in lock.values() for o in st.get("outs", [])
                        if o.get("path") == source), "")
        n_params = sum(p.numel() for p in model.parameters())
        provenance = {
            "git_commit": git_commit(), "dvc_lock_sha256": lock_hash, "source_model": source,
            "source_md5 (dvc.lock)": out_md5 or "none", "params_sha256": digest(cfg.params_file),
            "lifecycle": lifecycle_id(cfg.params_file), "merged_adapters": str(is_adapter_dir(source)).lower(),
        }
        card = model_card(name=cfg.registry.name, alias=cfg.registry.alias, source=source, out_dir=cfg.out_dir,
                          card_cfg=cfg.card, params=params, chain=chain, table=table, row=row,
                          gate_md="\n".join(["## Promotion gate", "", *summary_lines(decision), "", *rule_lines(decision)]),
                          digests=digests, provenance=provenance,
                          n_params=n_params, evaluate_metrics=cfg.evaluate_metrics, max_new_tokens=cfg.max_new_tokens,
                          onnx_dir=cfg.onnx.dir if cfg.onnx.enabled else None)
        tags = {"git_commit": provenance["git_commit"], "dvc_lock_sha256": lock_hash, "source_model": source,
                "source_md5": out_md5 or "none", "lifecycle": provenance["lifecycle"],
                "lineage": " <- ".join(s["stage"] for s in chain), "gate": f"passed ({row})"}
        with atomic_dir(cfg.out_dir) as tmp:
            model.generation_config.eos_token_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
            model.generation_config.pad_token_id = model.generation_config.pad_token_id or tokenizer.pad_token_id
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            card.save(tmp / "README.md")
            onnx_metrics = write_onnx(cfg.onnx, source, cfg.out_dir, tmp, model, tokenizer) if cfg.onnx.enabled else {}
            version = register(cfg.registry.name, cfg.registry.alias, model, tokenizer, card, tags,
                               cfg.max_new_tokens)
        import mlflow

        mlflow.set_tags({"promoted": "true", "promoted_model": row})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "README.md"))
        mlflow.log_artifact(cfg.report)
        metrics = {"promoted": True, "model": row, "source": source, "registered_model": cfg.registry.name,
                   "version": int(version), "alias": cfg.registry.alias, "params": n_params,
                   "lineage": [s["stage"] for s in chain], **tags, **onnx_metrics, "gate": decision}
        log_stage_metrics({"params": n_params, "version": int(version), **onnx_metrics,
                           **{f"gate.{n}.passed": int(m["passed"]) for n, m in decision["models"].items()}})
    write_json("metrics/export.json", metrics)
    return metrics


if __name__ == "__main__":
    run_stage("export", ExportConfig, run)
