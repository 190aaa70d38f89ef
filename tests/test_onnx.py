"""export.onnx: the exported model as one ONNX graph with its key/value cache, run by onnxruntime.

The tiny lifecycle's sft model is exported with `export.onnx.enabled: true`; onnxruntime's greedy answers must be
torch's token for token, alone and in a left-padded batch, and a failed export or check must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import flags, make_workdir, run_in_process, tiny_params, write_evaluation

NAME = "tiny-onnx"
SFT = {"instruction_em": flags(5, 20), "cot_accuracy": flags(2, 20), "refusal_rate": flags(18, 20),
       "over_refusal_rate": flags(0, 20), "prefers_chosen": flags(12, 20), "win_rate": [0.5] * 20}
PROMPTS = [  # not the stage's check_prompts: an independent check of the folder it wrote
    "Reverse the words.\n\nred green blue",
    "What is 4 plus 5?",
    "Count the letters.\n\nfox",
    "Name a colour.",
]


def onnx_params(**onnx) -> dict:
    export = {"model": "models/sft", "registry": {"name": NAME, "alias": "candidate"}, "max_new_tokens": 8,
              "onnx": {"enabled": True, **onnx}}
    return tiny_params(export=export)


def workdir(lifecycle, path, params: dict):
    wd = make_workdir(path, params)
    shutil.copytree(lifecycle["workdir"] / "data", wd / "data", dirs_exist_ok=True)  # make_workdir holds data/feedback
    shutil.copytree(lifecycle["workdir"] / "models", wd / "models", dirs_exist_ok=True)
    write_evaluation(wd, {"sft": SFT}, {"sft": {"perplexity": 120.0, "params": 30000}})
    return wd


@pytest.fixture(scope="module")
def exported(lifecycle, tmp_path_factory):
    wd = workdir(lifecycle, tmp_path_factory.mktemp("onnx"), onnx_params())
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{wd}/mlflow.db"
    try:
        metrics = run_in_process("export", wd)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    return {"workdir": wd, "metrics": metrics}


def assert_nothing_written(wd):
    import mlflow

    assert not (wd / "models/export").exists() and not (wd / "models/export.tmp").exists()
    assert not (wd / "metrics/export.json").exists()
    uri = os.environ["MLFLOW_TRACKING_URI"]  # this test's own store: no version was registered
    assert mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []


def test_onnx_greedy_answers_equal_torch_alone_and_batched(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.evaluation.chat import encode_prompts
    from posttrain.export.onnx_export import OnnxCausalLM

    wd, m = exported["workdir"], exported["metrics"]
    out = wd / "models/export/onnx"
    for f in ("model.onnx", "model.onnx.data", "export.json", "config.json", "generation_config.json",
              "tokenizer.json", "chat_template.jinja"):
        assert (out / f).exists(), f
    assert m["onnx_dir"] == "models/export/onnx" and m["onnx_opset"] == 18
    assert m["onnx_greedy_equal"] is True and m["onnx_equal_prompts"] == m["onnx_check_prompts"] == 3
    assert m["onnx_max_logit_diff"] < 1e-3
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    assert m["onnx_mb"] == pytest.approx(size, abs=1e-3)
    assert json.loads((wd / "metrics/export.json").read_text())["onnx_greedy_equal"] is True
    assert "`onnx/` holds the same model as one ONNX graph" in (wd / "models/export/README.md").read_text()

    torch_model = AutoModelForCausalLM.from_pretrained(wd / "models/export").eval()
    onnx_model, tok = OnnxCausalLM(out, num_threads=1), AutoTokenizer.from_pretrained(out)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    for batch in [chats[:1], chats[1:2], chats]:  # one prompt each, then all four left-padded
        enc = encode_prompts(tok, batch, "cpu")
        for extra in ({}, {"min_new_tokens": 12}):  # stopping at eos, and held past it
            want = torch_model.generate(**enc, max_new_tokens=12, do_sample=False, **extra)
            got = onnx_model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12, **extra)
            assert got.tolist() == want.tolist(), (batch, extra)
    assert (enc["attention_mask"] == 0).any()  # the batch really was padded


def test_a_failed_onnx_export_stops_the_stage_and_writes_nothing(lifecycle, tmp_path, monkeypatch):
    from transformers.exporters import OnnxExporter

    from stages.export import ExportError

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(OnnxExporter, "export_program", fail)
    wd = workdir(lifecycle, tmp_path / "wd", onnx_params())
    with pytest.raises(ExportError, match=r"exporting models/sft to ONNX failed, nothing was written .*frobnicate"):
        run_in_process("export", wd)
    assert_nothing_written(wd)


def test_greedy_tokens_that_differ_stop_the_stage(exported, lifecycle, tmp_path, monkeypatch):
    import posttrain.export.onnx_export as ox
    from stages.export import ExportError

    def copy_the_export(model_dir, out_dir, prompts, opset=None, optimize=True):  # skip a second trace
        shutil.copytree(exported["workdir"] / "models/export/onnx", out_dir, dirs_exist_ok=True)
        return {"seconds": 0.0, "opset": 18, "bytes": ox.folder_bytes(out_dir)}

    real_generate = ox.OnnxCausalLM.generate

    def off_by_one(self, input_ids, *args, **kwargs):  # a wrong last token on every answer
        out = real_generate(self, input_ids, *args, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % self.config.vocab_size
        return out

    monkeypatch.setattr(ox, "export_onnx", copy_the_export)
    monkeypatch.setattr(ox.OnnxCausalLM, "generate", off_by_one)
    wd = workdir(lifecycle, tmp_path / "wd", onnx_params())
    with pytest.raises(ExportError, match=r"differ from torch's on 3 of 3 export.onnx.check_prompts"):
        run_in_process("export", wd)
    assert_nothing_written(wd)


@pytest.mark.parametrize("onnx, message", [
    ({"check_prompts": ["only one"]}, "needs at least 2 prompts"),
    ({"dir": "../outside"}, "must be a folder name inside export.out_dir"),
    ({"check_new_tokens": 0}, "must be at least 1"),
    ({"check_prompts": ["What is 2 plus 3?", "What is 4 plus 5?"]}, "must differ in token length"),  # no padding
])
def test_bad_onnx_params_stop_before_anything_is_written(lifecycle, tmp_path, onnx, message):
    from stages.export import ExportError

    wd = workdir(lifecycle, tmp_path / "wd", onnx_params(**onnx))
    with pytest.raises(ExportError, match=message):
        run_in_process("export", wd)
    assert_nothing_written(wd)

