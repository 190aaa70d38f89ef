"""export: a LoRA sft model merged into a plain HF folder with a model card, registered in MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import REPO, flags, make_workdir, run_in_process, tiny_params, write_evaluation

NAME = "tiny-student"
N = 40
OUTCOMES = {  # a small evaluation: per-item outcomes as evaluate writes them (the evaluate stage is tested elsewhere)
    "base": {"instruction_em": flags(0, N), "cot_accuracy": flags(0, N), "refusal_rate": flags(0, N),
             "over_refusal_rate": flags(0, N), "prefers_chosen": flags(20, N), "win_rate": [0.0] * N},
    "cpt": {"instruction_em": flags(9, N), "cot_accuracy": flags(5, N), "refusal_rate": flags(36, N),
            "over_refusal_rate": flags(0, N), "prefers_chosen": flags(24, N), "win_rate": [0.5] * N},
    "sft": {"instruction_em": flags(10, N), "cot_accuracy": flags(4, N), "refusal_rate": flags(36, N),
            "over_refusal_rate": flags(0, N), "prefers_chosen": flags(24, N), "win_rate": [0.5] * N},
}
EXTRA = {"base": {"perplexity": 300.0, "params": 30000}, "cpt": {"perplexity": 110.0, "params": 30000},
         "sft": {"perplexity": 120.0, "params": 30000}}
LOCK = {"schema": "2.0", "stages": {
    "sft": {"cmd": "python -m stages.sft", "outs": [{"path": "models/sft", "md5": "abc123.dir"}]},
    "export": {"cmd": "python -m stages.export", "outs": [{"path": "models/export", "md5": "old.dir"}]},
}}


def export_params(**overrides) -> dict:
    export = {"model": "models/sft", "registry": {"name": NAME, "alias": "candidate"}, "max_new_tokens": 8}
    return tiny_params(export={**export, **overrides},
                       sft={"adapter": {"method": "lora"}, "train": {"max_steps": 2, "save_steps": 100}})


@pytest.fixture(scope="module")
def exported(lifecycle, tmp_path_factory):
    """The lifecycle copied, its sft retrained as a LoRA adapter on cpt, exported twice."""
    wd = tmp_path_factory.mktemp("export")
    make_workdir(wd, export_params())
    for name in ("data", "models"):
        shutil.copytree(lifecycle["workdir"] / name, wd / name, dirs_exist_ok=True)
    write_evaluation(wd, OUTCOMES, EXTRA)
    (wd / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    uri = f"sqlite:///{wd}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_in_process("sft", wd)  # models/sft is now an adapter over models/cpt
        first = run_in_process("export", wd)
        card_first = (wd / "models/export/README.md").read_text()
        second = run_in_process("export", wd)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    return {"workdir": wd, "uri": uri, "first": first, "second": second, "card_first": card_first}


def test_export_is_a_merged_hf_model_that_reloads_and_generates(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.model.loading import is_adapter_dir, load_model

    wd = exported["workdir"]
    out = wd / "models/export"
    assert is_adapter_dir(wd / "models/sft") and not is_adapter_dir(out)
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "chat_template.jinja", "README.md"):
        assert (out / f).exists(), f
    assert not list(out.glob("*.bin"))
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    merged = load_model(wd / "models/sft")  # the adapter chain merged in memory
    ids = torch.tensor([[1, 4, 7, 9, 11]])
    assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    enc = tok.apply_chat_template([{"role": "user", "content": "Count the words.\n\nred fox"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5


def test_registry_holds_each_export_as_a_version_with_alias_and_tags(exported):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=exported["uri"], registry_uri=exported["uri"])
    first, second = exported["first"], exported["second"]
    assert (first["version"], second["version"]) == (1, 2)
    current = client.get_model_version_by_alias(NAME, "candidate")
    assert int(current.version) == 2
    stages_hash = hashlib.sha256(json.dumps({"sft": LOCK["stages"]["sft"]}, sort_keys=True).encode()).hexdigest()
    for version in ("1", "2"):
        tags = client.get_model_version(NAME, version).tags
        assert tags["dvc_lock_sha256"] == stages_hash  # export's own lock entry is left out
        assert tags["source_md5"] == "abc123.dir"
        assert tags["git_commit"] == first["git_commit"] != ""
        assert tags["lineage"] == "sft <- cpt <- base"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(exported["uri"])
    try:
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")  # what `mlflow models serve` runs
        answers = served.predict(["Count the words.\n\nred fox"])
    finally:
        mlflow.set_tracking_uri(before)
    assert isinstance(answers[0], str) and "<|im_start|>" not in answers[0]  # chat-formatted, prompt not echoed


def test_model_card_lists_lineage_params_data_and_evaluation(exported):
    from huggingface_hub import ModelCard

    from posttrain.core.files import digest

    wd = exported["workdir"]
    card = ModelCard.load(wd / "models/export/README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0" and card.data.model_name == NAME
    text = card.text
    for stage in ("sft", "cpt", "base"):
        assert f"| {stage} | `models/{stage}` |" in text
    assert "| sft | `models/sft` | `models/cpt` | lora |" in text
    params = yaml.safe_load((wd / "params.yaml").read_text())
    for section in params:
        assert f"### {section}\n" in text
    assert "| **sft** (this model) | 120.000 | 0.250 |" in text
    assert f"| `data/processed/sft_train.jsonl` | `{digest(wd / 'data/processed/sft_train.jsonl')}` |" in text
    assert f"models:/{NAME}@candidate" in text
    assert exported["card_first"] == (wd / "models/export/README.md").read_text()  # same inputs, same card


def test_generate_from_the_registry_matches_the_folder(exported, monkeypatch):
    from transformers import AutoTokenizer

    from posttrain.serving.generate import load, main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported["uri"])
    prompt = "Sort the numbers.\\n\\n3 1 2"
    assert main(["--model", f"models:/{NAME}@candidate", "--max-new-tokens", "6", prompt]) == \
        main(["--model", str(exported["workdir"] / "models/export"), "--max-new-tokens", "6", prompt])
    registered, tok = load(f"models:/{NAME}@candidate")
    folder, _ = load(str(exported["workdir"] / "models/export"))
    ids = torch.tensor([[1, 4, 7, 9, 11]])
    assert torch.equal(registered(input_ids=ids).logits, folder(input_ids=ids).logits)
    assert tok.chat_template == AutoTokenizer.from_pretrained(exported["workdir"] / "models/export").chat_template


def test_lineage_follows_teacher_and_model_links():
    from posttrain.export.lineage import lineage

    params = {"base": {"source": "tiny", "out_dir": "models/base"},
              "sft": {"model": "models/base", "adapter": {"method": "lora"}, "out_dir": "models/sft"},
              "reward": {"model": "models/sft", "out_dir": "models/reward"},
              "align": {"model": "models/sft", "reward_model": "models/reward", "method": "dpo", "out_dir": "models/align"},
              "distill": {"teacher": "models/align", "method": "sequence", "out_dir": "models/distill"}}
    chain = lineage("models/distill", params)
    assert [s["stage"] for s in chain] == ["distill", "align", "sft", "base"]
    assert chain[1]["also_uses"] == ["models/reward"] and chain[2]["method"] == "lora"


@pytest.mark.parametrize("override, message", [
    ({"model": "models/align"}, "export.model 'models/align' does not exist"),
    ({"evaluate_metrics": "metrics/nope.json"}, "run evaluate first"),
])
def test_bad_input_stops_and_writes_nothing(lifecycle, tmp_path, override, message):
    import mlflow

    from stages.export import ExportError

    wd = make_workdir(tmp_path / "wd", export_params(**override))
    shutil.copytree(lifecycle["workdir"] / "models", wd / "models", dirs_exist_ok=True)
    write_evaluation(wd, OUTCOMES, EXTRA)
    with pytest.raises(ExportError, match=message):
        run_in_process("export", wd)
    assert not (wd / "models/export").exists() and not (wd / "metrics/export.json").exists()
    uri = os.environ["MLFLOW_TRACKING_URI"]  # this test's own store
    assert mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []


def gate_workdir(exported, tmp_path, monkeypatch, **export_overrides):
    """A copy of the exported workdir (models, the registry with versions 1-2) with export.* overridden."""
    wd = tmp_path / "gate"
    shutil.copytree(exported["workdir"], wd)
    params = yaml.safe_load((wd / "params.yaml").read_text())
    params["export"].update(export_overrides)
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd}/mlflow.db")
    return wd


def test_a_model_that_fails_the_gate_is_not_promoted(exported, tmp_path, monkeypatch):
    import mlflow

    from stages.export import ExportError

    shipped_gate = yaml.safe_load((REPO / "params.yaml").read_text())["export"]["gate"]  # params.yaml's, floors too
    wd = gate_workdir(exported, tmp_path, monkeypatch, model="models/base", gate=shipped_gate)  # 0 on every rate
    shutil.rmtree(wd / "models/export")
    with pytest.raises(ExportError, match=r"no model passed the promotion gate, nothing promoted \(alias candidate "
                                          r"stays at version 2\): base: instruction_em 0.000 vs sft: -0.250, p=.*"
                                          r"significantly worse"):
        run_in_process("export", wd)
    assert not (wd / "models/export").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{wd}/mlflow.db", registry_uri=f"sqlite:///{wd}/mlflow.db")
    assert int(client.get_model_version_by_alias(NAME, "candidate").version) == 2
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2  # no new version
    metrics = json.loads((wd / "metrics/export.json").read_text())
    assert metrics["promoted"] is False and metrics["alias_version"] == 2
    failed = metrics["gate"]["models"]["base"]["failed"]
    assert any(f.startswith("refusal_rate 0.000 vs sft: -0.900") for f in failed)
    assert not any(f.startswith("cot_accuracy") for f in failed)  # 0/40 against 4/40: p = 0.125, within noise
    assert any("refusal_rate 0.000 (needs >= 0.8)" == f for f in failed)
    report = (wd / "reports/export.md").read_text()
    assert "Shipped: **none**" in report and "| base | no |" in report
    run = client.search_runs([client.get_experiment_by_name("lifecycle").experiment_id],
                             filter_string="tags.dvc_stage = 'export'", order_by=["start_time DESC"])[0]
    assert run.info.status == "FAILED" and run.data.tags["promoted"] == "false"
    assert "significantly worse" in run.data.tags["gate.base"] and run.data.metrics["gate.base.passed"] == 0


def test_auto_ships_the_best_model_that_passes(exported, tmp_path, monkeypatch):
    import mlflow

    gate = {"reference": "sft", "alpha": 0.05, "primary": "cot_accuracy", "candidates": ["base", "cpt", "sft"],
            "rules": [{"metric": "instruction_em", "test": "not_worse"}, {"metric": "cot_accuracy", "test": "not_worse"},
                      {"metric": "refusal_rate", "test": "at_least", "value": 0.8}]}
    wd = gate_workdir(exported, tmp_path, monkeypatch, model="auto", gate=gate)
    metrics = run_in_process("export", wd)
    # base fails (significantly worse); cpt and sft pass, and cpt's CoT accuracy 5/40 beats sft's 4/40
    assert metrics["promoted"] is True and metrics["model"] == "cpt" and metrics["source"] == "models/cpt"
    assert metrics["version"] == 3 and [m["passed"] for m in metrics["gate"]["models"].values()] == [False, True, True]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{wd}/mlflow.db", registry_uri=f"sqlite:///{wd}/mlflow.db")
    assert int(client.get_model_version_by_alias(NAME, "candidate").version) == 3
    card = (wd / "models/export/README.md").read_text()
    assert "| **cpt** (this model) |" in card and "Shipped: **cpt**" in card
