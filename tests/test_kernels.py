"""How sft and cpt execute the model: `kernels` (torch ops, or Liger's fused RMSNorm/RoPE/SwiGLU through TRL's
use_liger_kernel on a GPU) and `compile` (torch.compile through transformers' torch_compile)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_workdir, run_in_process, tiny_params


def test_auto_keeps_torch_ops_where_liger_cannot_run():
    from posttrain.model.kernels import liger_problem, resolve, trainer_kwargs

    assert resolve("auto", "cpu") == "torch" and trainer_kwargs("torch") == {}
    assert resolve("torch", "cuda") == "torch"
    assert resolve("auto", "cuda") == ("torch" if liger_problem("cuda") else "liger")
    with pytest.raises(ValueError, match=r"kernels: liger cannot run here: Liger's kernels are Triton kernels and "
                                         r"need a CUDA GPU"):
        resolve("liger", "cpu")
    with pytest.raises(ValueError, match=r"kernels must be one of"):
        resolve("triton", "cpu")
    if liger_problem("cuda"):  # liger-kernel / Triton missing (as in CI): a GPU alone is not enough
        with pytest.raises(ValueError, match=r"kernels: liger cannot run here: .*not installed \(pip install -e"):
            resolve("liger", "cuda")


def test_liger_asks_trl_for_the_layer_kernels_only():
    """TRL keeps its fused LM head (loss_head chooses it) only when liger's fused cross-entropy stays off."""
    from trl import SFTConfig

    from posttrain.model.kernels import trainer_kwargs

    args = SFTConfig(output_dir="unused", use_cpu=True, **trainer_kwargs("liger"))
    assert args.use_liger_kernel is True
    config = args.liger_kernel_config
    assert config["rms_norm"] and config["rope"] and config["swiglu"]
    assert not config["fused_linear_cross_entropy"] and not config["cross_entropy"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU error")
@pytest.mark.parametrize("stage,upstream", [("sft", "cpt"), ("cpt", "base")])
def test_liger_without_a_gpu_stops_the_stage_before_anything_is_written(lifecycle, tmp_path, stage, upstream):
    workdir = make_workdir(tmp_path / "w", tiny_params(**{stage: {"kernels": "liger", "out_dir": f"models/{stage}_lg"}}))
    shutil.copytree(lifecycle["workdir"] / "data", workdir / "data", dirs_exist_ok=True)
    shutil.copytree(lifecycle["workdir"] / "models" / upstream, workdir / "models" / upstream, dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"kernels: liger cannot run here: .*need a CUDA GPU"):
        run_in_process(stage, workdir)
    assert not (workdir / f"models/{stage}_lg").exists() and not (workdir / f"metrics/{stage}.json").exists()
    assert not (workdir / f"checkpoints/{stage}").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def llama_module_restored():
    """Liger swaps functions and classes of transformers' Llama module for the whole process: put them back, so
    that later tests' CPU models do not meet Triton kernels."""
    from transformers.models.llama import modeling_llama

    saved = {name: getattr(modeling_llama, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    yield
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


def _train_three_steps(kernels: str, tmp_path):
    """The sft stage's own SFTConfig (packing, torch_varlen on a GPU, TRL's fused head) on the bench's tiny shape,
    at learning rate 0: the weights stay the initial ones, so the runs can be compared output for output."""
    import dataclasses

    from trl import SFTTrainer

    from bench.throughput import SHAPES, build_dataset, build_model, build_tokenizer
    from posttrain.core.config import load_config
    from posttrain.model.attention import set_attention
    from stages import sft

    cfg = load_config("sft", sft.SFTStageConfig, params=tiny_params(sft={"packing": True, "kernels": kernels}))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_steps=3, batch_size=4, learning_rate=0.0, logging_steps=1, warmup_ratio=0.0, save_steps=1000))
    args = sft.training_args(cfg, tmp_path / kernels)
    args.report_to = []
    shape = SHAPES["tiny"]
    model = build_model(shape, seed=0)
    set_attention(model, cfg.attention, cfg.packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=build_dataset("sft", 64, shape, seed=0),
                         processing_class=build_tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logged], [h["grad_norm"] for h in logged], model


def _packed_hidden_states(model):
    """The last hidden states (after the final norm: order 1) of three examples packed into one row."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, 512, (n,), generator=g) for n in (17, 40, 9)]
    ids = torch.cat(seqs)[None].cuda()
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None].cuda()
    with torch.no_grad():
        return model.model(input_ids=ids, position_ids=positions).last_hidden_state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton: CUDA only")
def test_liger_trains_packed_batches_like_torch_ops_on_a_gpu(llama_module_restored, tmp_path):
    from posttrain.model.kernels import liger_problem

    assert liger_problem() is None, liger_problem()
    torch_losses, torch_grad_norms, torch_model = _train_three_steps("torch", tmp_path)
    expected = _packed_hidden_states(torch_model.eval())  # before liger patches the Llama module
    liger_losses, liger_grad_norms, liger_model = _train_three_steps("liger", tmp_path)
    assert "liger" in liger_model.model.layers[0].mlp.forward.__func__.__module__  # the Trainer applied them
    # Same weights, same batches: only the kernels differ (and their bf16 rounding under autocast)
    assert liger_losses == pytest.approx(torch_losses, rel=1e-2)
    assert liger_grad_norms == pytest.approx(torch_grad_norms, rel=5e-2)
    # RoPE over restarting position_ids, RMSNorm and SwiGLU, forward in fp32 (attention rounds to bf16 in both)
    torch.testing.assert_close(_packed_hidden_states(liger_model.eval()), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("stage,upstream", [("cpt", "base")])
def test_compile_trains_the_stage_compiled_and_saves_the_plain_model(lifecycle, tmp_path, stage, upstream):
    """compile: true goes through transformers' torch_compile (inductor): graphs are compiled, the run's losses
    match the uncompiled run of the same seed, and the saved weights load as a plain model. cpt only: sft passes
    `compile` to the trainer's torch_compile the same way (stages/sft.py), and its batches of changing shapes
    recompile for ~200 s of inductor on 2 cores, more than the suite's budget carries."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from posttrain.model.loading import load_model

    workdir = make_workdir(tmp_path / "w", tiny_params(**{stage: {"compile": True, "out_dir": f"models/{stage}_c"}}))
    shutil.copytree(lifecycle["workdir"] / "data", workdir / "data", dirs_exist_ok=True)
    shutil.copytree(lifecycle["workdir"] / "models" / upstream, workdir / "models" / upstream, dirs_exist_ok=True)
    torch._dynamo.reset()
    counters.clear()
    try:
        metrics = run_in_process(stage, workdir)
        compiled_graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # later tests run uncompiled models
    assert compiled_graphs > 0
    plain = lifecycle["metrics"][stage]
    assert metrics["train_loss"] == pytest.approx(plain["train_loss"], rel=2e-2)
    after = "perplexity_after" if stage == "cpt" else "eval_loss"
    assert metrics[after] == pytest.approx(plain[after], rel=2e-2)
    model = load_model(workdir / f"models/{stage}_c")  # no torch.compile wrapper's "_orig_mod." in its names
    assert not any("_orig_mod" in name for name, _ in model.named_parameters())
