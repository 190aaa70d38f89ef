"""The exported model's Hugging Face model card, rendered from templates/model_card.md: lineage, evaluation table,
the promotion gate's verdict, data digests, provenance, how to use it and every stage's params."""

from __future__ import annotations

from pathlib import Path

import yaml

from posttrain.core.markdown import markdown_table
from posttrain.export.lineage import base_model_id

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
CARD_METRICS = (("instruction_em", "exact_match"), ("cot_accuracy", "accuracy"), ("refusal_rate", "refusal_rate"),
                ("perplexity", "perplexity"))


def evaluation_table(table: dict[str, dict], highlight: str | None) -> str:
    """evaluate's scalar columns, one row per model; the exported one in bold."""
    if not table:
        return "(no evaluate table)"
    cols = [c for c, v in next(iter(table.values())).items() if not isinstance(v, (dict, list))]
    return markdown_table(["model", *cols], [[f"**{n}** (this model)" if n == highlight else n, *(r.get(c) for c in cols)]
                                             for n, r in table.items()])


def model_card(*, name: str, alias: str, source: str, out_dir: str, card_cfg, params: dict, chain: list[dict],
               table: dict, row: str | None, gate_md: str, digests: dict[str, str], provenance: dict[str, str],
               n_params: int, evaluate_metrics: str, max_new_tokens: int, onnx_dir: str | None):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base_id = base_model_id(chain, params)
    evals = [EvalResult(task_type="text-generation", dataset_type="local",
                        dataset_name="llm-lifecycle held-out suites (stages/evaluate.py)",
                        metric_type=kind, metric_name=metric, metric_value=table[row][metric])
             for metric, kind in CARD_METRICS if row is not None and table[row].get(metric) is not None]
    data = ModelCardData(language=card_cfg.language, license=card_cfg.license, library_name="transformers",
                         pipeline_tag="text-generation", tags=card_cfg.tags, base_model=base_id, model_name=name,
                         eval_results=evals or None)
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), name=name, alias=alias, source=source, out_dir=out_dir, chain=chain,
        base_id=base_id, n_params=n_params, evaluate_metrics=evaluate_metrics, row=row,
        evaluation=evaluation_table(table, row), gate=gate_md, digests=digests, provenance=provenance,
        onnx_dir=onnx_dir, max_new_tokens=max_new_tokens,
        params_yaml={k: yaml.safe_dump({k: v}, sort_keys=False).rstrip() for k, v in params.items()})
