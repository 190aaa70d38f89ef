"""The memory planner (posttrain.train.plan): its counts match real models, its estimate adds up and moves the right
way, the command plans every training stage, and every training stage logs the plan next to its measured peak."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO, tiny_params

from posttrain.core.config import AdapterConfig, build, stage_section
from posttrain.train import plan as plan_cli
from posttrain.train.memory import estimate as plan

SHAPE = plan.Shape(vocab=320, hidden=32, layers=2, heads=2, kv_heads=2, head_dim=16, intermediate=64, tied=True)


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=SHAPE.vocab, hidden_size=SHAPE.hidden, num_hidden_layers=SHAPE.layers,
                                        num_attention_heads=SHAPE.heads, num_key_value_heads=SHAPE.kv_heads,
                                        intermediate_size=SHAPE.intermediate, tie_word_embeddings=True))


def wide_llama():
    """8.6 MiB of fp32 weights: AdamW's states (2 x 8.6 MiB) outweigh a tiny batch's activations."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=SHAPE.vocab, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))


def adapter(method: str) -> AdapterConfig:
    return build(AdapterConfig, {**stage_section(tiny_params(), "sft")["adapter"], "method": method}, "sft.adapter")


def test_shape_counts_the_parameters_of_a_real_model():
    model = tiny_llama()
    assert plan.shape_of(model.config) == SHAPE
    assert SHAPE.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "freeze"])
def test_trainable_parameters_match_peft(method):
    from peft import get_peft_model

    from posttrain.model.loading import apply_freeze, peft_config

    model, a = tiny_llama(), adapter(method)
    apply_freeze(model, a)
    if (pc := peft_config(a)) is not None:
        model = get_peft_model(model, pc)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.trainable_params(SHAPE, method, a) == real


def test_estimate_adds_up_and_moves_with_batch_method_and_checkpointing():
    kw = dict(adapter=adapter("full"), precision="fp32", seq_len=128, device="cpu")
    full = plan.estimate(SHAPE, method="full", batch=8, **kw)
    parts = sum(full[k] for k in ("weights", "grads", "optimizer", "activations", "lm_head", "runtime"))
    assert full["total"] == pytest.approx(parts)
    n = SHAPE.params()
    assert full["optimizer"] * plan.MiB == pytest.approx(8 * n)
    # with one micro-batch the gradients are made as backward frees the activations: they add to the peak only by
    # what they exceed them by (none here); accumulated over micro-batches they are all there
    assert full["grads"] == 0 < full["activations"] and 4 * n < (full["activations"] + full["lm_head"]) * plan.MiB
    accum = plan.estimate(SHAPE, method="full", batch=8, grad_accum=4, **kw)
    assert accum["grads"] * plan.MiB == pytest.approx(4 * n)
    assert accum["total"] - full["total"] == pytest.approx(4 * n / plan.MiB)
    one_token = plan.estimate(SHAPE, method="full", batch=1, loss_head="compact", **{**kw, "seq_len": 1})
    assert one_token["grads"] > 0  # one token: the gradients outweigh its activations
    assert one_token["grads"] * plan.MiB == pytest.approx(
        4 * n - (one_token["activations"] + one_token["lm_head"]) * plan.MiB)

    assert plan.estimate(SHAPE, method="full", batch=16, **kw)["activations"] > full["activations"]
    big = plan.Shape(**{**dataclasses.asdict(SHAPE), "layers": 24, "hidden": 512, "intermediate": 1408,
                        "head_dim": 256})
    lora = plan.estimate(big, method="lora", batch=8, **{**kw, "adapter": adapter("lora")})
    assert lora["optimizer"] < plan.estimate(big, method="full", batch=8, **kw)["optimizer"] / 5
    plain = plan.estimate(big, method="full", batch=8, **kw)
    ckpt = plan.estimate(big, method="full", batch=8, gradient_checkpointing=True, **kw)
    assert ckpt["activations"] < plain["activations"]


def test_max_batch_fits_the_budget():
    kw = dict(method="full", adapter=adapter("full"), precision="fp32", seq_len=128, device="cpu")
    budget = plan.estimate(SHAPE, batch=8, **kw)["total"] + 0.01
    assert plan.max_batch(SHAPE, budget, **kw) == 8
    assert plan.max_batch(SHAPE, 0.001, **kw) == 0


def test_plan_command_lists_every_method_of_every_training_stage(tmp_path, capsys):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    rows = plan_cli.main(["--params", str(params), "--device", "cpu", "--budget-gib", "1", "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    for stage in ("cpt", "sft", "reward", "align", "rft", "distill"):
        assert f"## {stage}:" in out
    sft = {r["method"]: r for r in rows if r["stage"] == "sft"}
    assert "qlora" not in sft  # no GPU here: qlora is not planned for the CPU
    assert set(sft) == set(plan.METHODS) - {"qlora"}
    assert sft["full"]["configured"] and sft["full"]["fits"] and sft["full"]["max_batch"] >= 1
    assert (tmp_path / "p.json").exists()


def test_plan_on_a_gpu_with_too_small_a_budget_says_nothing_fits():
    rows = plan_cli.main(["--params", str(REPO / "params.yaml"), "--device", "cuda", "--budget-gib", "0.001",
                      "--stages", "sft"])
    assert {r["method"] for r in rows} == set(plan.METHODS)
    assert not any(r["fits"] for r in rows) and all(r["max_batch"] == 0 for r in rows)


def test_training_stages_log_the_plan_next_to_their_measured_peak(lifecycle):
    for stage in ("cpt", "sft"):
        m = lifecycle["metrics"][stage]
        assert m["plan_estimate_mb"] > 0 and m["train_peak_memory_mb"] > 0, stage
        assert m["plan_error_pct"] == pytest.approx(
            100 * (m["plan_estimate_mb"] - m["train_peak_memory_mb"]) / m["train_peak_memory_mb"])
        # the early peak is taken during training: above nothing, at most the whole run's
        assert 0 < m["early_peak_memory_mb"] <= m["train_peak_memory_mb"], stage
        assert m["plan_error_early_pct"] == pytest.approx(
            100 * (m["plan_estimate_mb"] - m["early_peak_memory_mb"]) / m["early_peak_memory_mb"])
        assert m["tensor_peak_mb"] > 0, stage  # the stage's own first steps, profiled


def test_trainer_estimate_follows_the_loss_head_in_use(tmp_path):
    """With loss_head=compact the plan counts [labelled tokens, vocab] logits instead of TRL's fused tiles."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from bench.throughput import build_tokenizer
    from posttrain.model.lm_head import set_loss_head
    from posttrain.train.memory.estimate import COMPACT_BYTES, MiB, trainer_estimate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, tie_word_embeddings=True))
    # half of every row is a loss-masked prompt: compact projects only the other half
    ds = Dataset.from_list([{"input_ids": list(range(4, 4 + n)), "completion_mask": [0] * (n // 2) + [1] * (n - n // 2)}
                            for n in (20, 30, 40)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, report_to=[],
                     use_cpu=True, completion_only_loss=True)  # as stages.sft sets it (else TRL labels every token)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=build_tokenizer())
    fused = trainer_estimate(trainer)["lm_head"]
    assert set_loss_head(trainer, "compact") == "compact"
    compact = trainer_estimate(trainer)
    tokens = compact["tokens"]
    labelled = 20 + 15  # a batch of 2 holds at most the two rows with the most labels (40 -> 20, 30 -> 15)
    expected = (labelled * 512 * COMPACT_BYTES + tokens * 32 * 4 + 512 * 32 * 4) / MiB
    assert compact["lm_head"] == pytest.approx(expected) and compact["lm_head"] != pytest.approx(fused)


def test_compact_head_plan_counts_the_labels_trl_leaves_after_tokenising(tmp_path):
    """Prompt/completion rows (the sft stage's form): TRL 1.x tokenises them into input_ids + labels (-100 on
    the prompt), with no completion_mask left; the plan must count the completion tokens, not every token."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.throughput import build_tokenizer
    from posttrain.model.lm_head import set_loss_head
    from posttrain.train.memory.estimate import COMPACT_BYTES, MiB, trainer_estimate

    model = tiny_llama()  # only planned, never run: the tokenizer's ids need not fit its vocabulary
    tokenizer = build_tokenizer()
    ds = Dataset.from_list([{"prompt": "a " * 30, "completion": "b " * n} for n in (2, 3, 5)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, report_to=[],
                     use_cpu=True, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    rows = trainer.train_dataset
    assert "completion_mask" not in rows.column_names and "labels" in rows.column_names
    counts = sorted(sum(1 for x in labels if x != -100) for labels in rows["labels"])
    assert 0 < counts[-1] < max(len(ids) for ids in rows["input_ids"])  # the prompt carries no loss
    assert set_loss_head(trainer, "compact") == "compact"
    est = trainer_estimate(trainer)
    v, h = SHAPE.vocab, SHAPE.hidden
    head = (sum(counts[-2:]) * v * COMPACT_BYTES + est["tokens"] * h * 4 + v * h * 4) / MiB
    assert est["lm_head"] == pytest.approx(head)


def test_cpu_peak_window_forgets_what_came_before_it():
    """A stage's training peak must not include an earlier, larger allocation in the same process."""
    import torch

    from posttrain.core.runtime import peak_memory_mb, reset_peak_memory

    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    del big
    reset_peak_memory()
    small = torch.ones(50 * 2**20 // 4)
    in_use = reset_peak_memory()
    assert peak_memory_mb() < in_use + 100, "the 400 MiB freed before the window still counts"
    del small


def test_trainer_estimate_reads_the_longest_pair_of_a_reward_dataset(tmp_path):
    """TRL 1.x names a reward dataset's columns chosen_ids / rejected_ids; the plan pads to the longest, not to
    max_length (it read only the 0.x names and planned every pair at max_length: 2x on the default)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from bench.throughput import build_tokenizer
    from posttrain.train.memory.estimate import trainer_estimate

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                       pad_token_id=0))
    ds = Dataset.from_list([{"chosen_ids": list(range(4, 4 + n)), "rejected_ids": list(range(4, 4 + n + 3))}
                            for n in (5, 9, 12)])
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=256, report_to=[],
                        use_cpu=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=build_tokenizer())
    assert trainer_estimate(trainer)["tokens"] == 2 * 2 * 15  # chosen + rejected of a batch of 2, longest 15


def _train_tiny_sft(tmp_path, max_steps, allocate_at_step, mib=300):
    """Train a tiny SFT run that makes (and frees) a touched `mib` MiB tensor in step `allocate_at_step`."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.throughput import build_tokenizer
    from posttrain.train.memory.measure import MemoryWindow

    class Allocate(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == allocate_at_step - 1:  # inside that step
                big = torch.ones(mib * 2**20 // 4)  # touched: RSS sees it
                del big

    ds = Dataset.from_list([{"input_ids": list(range(4, 4 + n))} for n in (20, 30, 40, 50)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, max_steps=max_steps,
                     report_to=[], use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=build_tokenizer(),
                         callbacks=[Allocate()])
    window = MemoryWindow(trainer)
    trainer.train()
    return window.metrics()


def test_early_peak_is_taken_through_the_profiled_steps_only(tmp_path):
    """A larger allocation after the first TENSOR_STEPS steps raises the whole run's peak, not the early one."""
    from posttrain.train.memory.measure import TENSOR_STEPS

    m = _train_tiny_sft(tmp_path, max_steps=TENSOR_STEPS + 1, allocate_at_step=TENSOR_STEPS + 1)
    assert m["train_peak_memory_mb"] - m["early_peak_memory_mb"] > 250, m


def test_rss_peak_includes_the_profiled_steps(tmp_path):
    """The first batch is the longest with group_by_length: the RSS peak must not start after the profiled
    steps (to leave the profiler's buffers out), or it misses it. What step 1 held shows in both peaks."""
    from posttrain.train.memory.measure import TENSOR_STEPS

    m = _train_tiny_sft(tmp_path, max_steps=TENSOR_STEPS + 2, allocate_at_step=1)
    assert m["tensor_peak_mb"] >= 300, m
    assert m["train_peak_memory_mb"] >= 300 and m["early_peak_memory_mb"] >= 300, m


def test_rss_taken_to_read_the_profilers_results_is_not_trainings(tmp_path, monkeypatch):
    """Building the profiler's event tree takes RSS after the profiled steps: the window leaves it out. Here the
    reading of the results is made to hold 300 MiB (touched) on top of what it really does."""
    import torch

    from posttrain.train.memory import measure as training

    read = training.allocated_peak_mb

    def read_holding_300_mib(profiler):
        big = torch.ones(300 * 2**20 // 4)
        del big
        return read(profiler)

    monkeypatch.setattr(training, "allocated_peak_mb", read_holding_300_mib)
    m = _train_tiny_sft(tmp_path, max_steps=training.TENSOR_STEPS + 1, allocate_at_step=0, mib=0)
    assert m["tensor_peak_mb"] < 250 and m["train_peak_memory_mb"] < 250, m


def test_tensor_peak_counts_what_the_first_steps_hold_at_once(tmp_path):
    """On CPU the tensor peak comes from torch's allocator (under the profiler), not from RSS: a 200 MiB tensor
    made and freed inside step 1 shows up in it, on top of the models' own bytes."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench.throughput import build_tokenizer
    from posttrain.train.memory.measure import MemoryWindow

    class AllocateInStepOne(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                big = torch.empty(200 * 2**20 // 4)  # never touched: RSS would not see it, the allocator does
                del big

    ds = Dataset.from_list([{"input_ids": list(range(4, 4 + n))} for n in (20, 30, 40, 50)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, max_steps=2,
                     report_to=[], use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=build_tokenizer(),
                         callbacks=[AllocateInStepOne()])
    window = MemoryWindow(trainer)
    trainer.train()
    m = window.metrics()
    step = m["tensor_peak_mb"] - window.models_mb
    assert 200 <= step < 230, m  # the 200 MiB, plus what a 2-row step of a tiny model holds
    assert m["plan_tensors_mb"] == pytest.approx(window.plan_parts["total"] - window.plan_parts["runtime"])
    assert m["plan_error_tensor_pct"] == pytest.approx(
        100 * (m["plan_tensors_mb"] - m["tensor_peak_mb"]) / m["tensor_peak_mb"])


def _train_with_a_long_fourth_batch(tmp_path, **window_kwargs):
    """Five sequential SFT steps on wide_llama whose forward holds 200 MiB on batches longer than 40 tokens;
    only step 4's batch is. Returns the window's metrics, the window and the model's fp32 MiB."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.throughput import build_tokenizer
    from posttrain.train.memory.estimate import MiB
    from posttrain.train.memory.measure import MemoryWindow

    model = wide_llama()

    def hold_on_long_batches(module, inputs, kwargs):
        if kwargs["input_ids"].shape[1] > 40:
            module.held = torch.empty(200 * 2**20 // 4)  # kept on the module: live through this step's backward

    model.register_forward_pre_hook(hold_on_long_batches, with_kwargs=True)
    lengths = (20, 20, 30, 30, 10, 10, 50, 50, 10, 10)  # sequential batches of 2: step 4 is the long one
    ds = Dataset.from_list([{"input_ids": list(range(4, 4 + n))} for n in lengths])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, max_steps=5,
                     report_to=[], use_cpu=True, save_strategy="no", train_sampling_strategy="sequential")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=build_tokenizer())
    window = MemoryWindow(trainer, **window_kwargs)
    trainer.train()
    return window.metrics(), window, sum(p.numel() * 4 for p in model.parameters()) / MiB


def test_tensor_peak_covers_a_longer_batch_after_the_first_steps(tmp_path):
    """With random batches the longest rows come late. A step whose batch is longer than every profiled one is
    profiled too, and its peak counts what was live before it: the model and AdamW's two states."""
    m, window, params_mb = _train_with_a_long_fourth_batch(tmp_path)
    # steps 1-2 (rows of 20 and 30 tokens) in one window, then step 4 (50); not steps 3 and 5 (10)
    assert m["tensor_profiled_windows"] == 2, m
    in_step = m["tensor_peak_mb"] - window.models_mb - 2 * params_mb  # less what was live before step 4
    assert params_mb + 200 <= in_step < params_mb + 205, (in_step, params_mb, m)  # its gradients and the 200


def test_throughput_bench_window_profiles_the_first_steps_only(tmp_path):
    """bench.throughput times stock TRL's random batches next to ours: no variant may pay for later windows."""
    m, _, _ = _train_with_a_long_fourth_batch(tmp_path, profile_longer_batches=False)
    assert m["tensor_profiled_windows"] == 1, m
    assert m["tensor_peak_mb"] < 100, m  # step 4's 200 MiB is not in it


def test_resumed_runs_tensor_peak_counts_the_loaded_optimizer_states_once(tmp_path):
    """A resumed run loads AdamW's states before its first profiled step; a fresh run makes them inside it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.throughput import build_tokenizer
    from posttrain.train.memory.measure import MemoryWindow

    ds = Dataset.from_list([{"input_ids": list(range(4, 34))} for _ in range(20)])

    def tensor_peak(max_steps, resume_from):
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64,
                         max_steps=max_steps, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2)
        trainer = SFTTrainer(model=wide_llama(), args=args, train_dataset=ds, processing_class=build_tokenizer())
        window = MemoryWindow(trainer)
        trainer.train(resume_from_checkpoint=resume_from)
        return window.metrics()["tensor_peak_mb"]

    fresh = tensor_peak(2, None)
    resumed = tensor_peak(4, str(tmp_path / "checkpoint-2"))
    assert resumed == pytest.approx(fresh, abs=1.0)  # the states are 17 MiB


def test_a_windows_tensor_peak_starts_from_what_it_sees_allocated():
    """c10's running total keeps blocks freed while nothing profiled: a window's peak is read from its own start."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from posttrain.train.memory.measure import allocated_peak_mb

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        earlier = torch.empty(50 * 2**20 // 4)
    del earlier  # freed outside a window: the running total still holds its 50 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        block = torch.empty(10 * 2**20 // 4)
        del block
    assert allocated_peak_mb(p) == pytest.approx(10, abs=0.5)


def test_runtime_part_is_cpu_only_and_tensors_are_the_rest():
    kw = dict(method="full", adapter=adapter("full"), precision="bf16", batch=4, seq_len=128, loss_head="compact")
    cpu, cuda = plan.estimate(SHAPE, device="cpu", **kw), plan.estimate(SHAPE, device="cuda", **kw)
    assert cpu["runtime"] > 0 and cuda["runtime"] == 0
    assert cpu["tensors"] == pytest.approx(cpu["total"] - cpu["runtime"])
    assert cuda["tensors"] == pytest.approx(cuda["total"])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_head_buffer_is_a_full_tile_wide_whatever_the_vocabulary(device):
    """TRL allocates [min(tokens, 4096), 32768] for its tile even for a 320-word vocabulary: the tensors count all
    of it; on CPU the columns past the vocabulary are never touched, so the RSS total does not."""
    kw = dict(method="full", adapter=adapter("full"), precision="bf16", batch=4, seq_len=128, loss_head="fused")
    est = plan.estimate(SHAPE, device=device, **kw)
    tokens = 4 * 128
    buffer = tokens * plan.LM_TILE_VOCAB * 2 / plan.MiB
    assert est["lm_head"] >= buffer
    if device == "cpu":
        untouched = tokens * (plan.LM_TILE_VOCAB - SHAPE.vocab) * 2 / plan.MiB
        compact = plan.estimate(SHAPE, device=device, **{**kw, "loss_head": "compact"})  # the same runtime, no buffer
        assert compact["runtime"] - est["runtime"] == pytest.approx(untouched)

