"""export: a LoRA sft model merged into a plain HF folder with a model card, registered in MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import make_workdir, run_stage, tiny_params

NAME = "tiny-student"
TABLE = {  # a small evaluate table (the evaluate stage itself is tested elsewhere)
    "base": {"perplexity": 300.0, "instruction_em": 0.0, "cot_accuracy": 0.0, "params": 30000},
    "sft": {"perplexity": 120.0, "instruction_em": 0.25, "cot_accuracy": 0.1, "params": 30000},
}
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
    (wd / "metrics").mkdir()
    (wd / "metrics/evaluate.json").write_text(json.dumps(TABLE))
    (wd / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    uri = f"sqlite:///{wd}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_stage("sft", wd)  # models/sft is now an adapter over models/cpt
        first = run_stage("export", wd)
        card_first = (wd / "models/export/README.md").read_text()
        second = run_stage("export", wd)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    return {"workdir": wd, "uri": uri, "first": first, "second": second, "card_first": card_first}


def test_export_is_a_merged_hf_model_that_reloads_and_generates(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import is_adapter_dir, load_model

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

    from posttrain.files import digest

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

    from posttrain.generate import load, main

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
    from stages.export import lineage

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
    (wd / "metrics").mkdir()
    (wd / "metrics/evaluate.json").write_text(json.dumps(TABLE))
    with pytest.raises(ExportError, match=message):
        run_stage("export", wd)
    assert not (wd / "models/export").exists() and not (wd / "metrics/export.json").exists()
    uri = os.environ["MLFLOW_TRACKING_URI"]  # this test's own store
    assert mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []
