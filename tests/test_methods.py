"""Every fine-tuning `method` trains through the real sft stage on the tiny model; PEFT outputs are
adapters only, small, and load back through the chain; qlora without a GPU stops with a clear message.
And `base` loads a model from a local path, adding a chat template where it has none."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.model.loading import is_adapter_dir, load_model, load_tokenizer

METHODS = ["full", "freeze", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]


def sft_workdir(lifecycle, path, method: str):
    params = tiny_params(sft={"adapter": {"method": method, "freeze_train_top_k": 1, "lora_r": 4, "lora_alpha": 8},
                              "train": {"max_steps": 4, "save_steps": 100}})
    make_workdir(path, params)
    for name in ("data/processed", "models/base", "models/cpt"):
        shutil.copytree(lifecycle["workdir"] / name, path / name, dirs_exist_ok=True)
    return path


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_its_output_loads(lifecycle, tmp_path, method):
    work = sft_workdir(lifecycle, tmp_path, method)
    metrics = run_in_process("sft", work)
    out = work / "models/sft"
    assert metrics["method"] == method
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    if method == "full":
        assert metrics["trainable_share"] == 1.0
        assert not is_adapter_dir(out)
    else:
        assert 0 < metrics["trainable_share"] < 1.0
    if method not in ("full", "freeze"):
        assert is_adapter_dir(out)
        assert not (out / "model.safetensors").exists()
        adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
        assert adapter_bytes < 0.5 * (work / "models/cpt/model.safetensors").stat().st_size
    model, tokenizer = load_model(out), load_tokenizer(out)
    ids = tokenizer("Sort the numbers.", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.isfinite().all()


def test_qlora_without_gpu_says_why_and_writes_nothing(lifecycle, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: qlora is allowed here")
    work = sft_workdir(lifecycle, tmp_path, "qlora")
    with pytest.raises(RuntimeError, match="method=qlora needs a CUDA GPU"):
        run_in_process("sft", work)
    assert not (work / "models/sft").exists()


def test_base_loads_a_local_model_and_adds_a_chat_template(lifecycle, tmp_path):
    local = tmp_path / "my-model"
    shutil.copytree(lifecycle["workdir"] / "models/base", local, dirs_exist_ok=True)
    tok_cfg = local / "tokenizer_config.json"
    tok_cfg.write_text(tok_cfg.read_text().replace('"chat_template"', '"_unused_template"'))
    (local / "chat_template.jinja").unlink(missing_ok=True)
    work = make_workdir(tmp_path / "w", tiny_params(base={"source": str(local)}))
    metrics = run_in_process("base", work)
    assert metrics["params"] > 0
    tokenizer = load_tokenizer(work / "models/base")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
