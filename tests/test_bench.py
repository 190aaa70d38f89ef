"""bench.device_wheels: the wheels carried to a GPU machine are pinned at the versions CI installs.
bench.throughput: tokens/s after the warm-up, a failing variant skipped, the batch ablation, the profile table."""

from __future__ import annotations

import re

import pytest
from conftest import REPO


def test_carried_wheels_are_pinned_at_this_environments_versions():
    from bench.device_wheels import CARRY, pinned

    pins = dict(p.split("==") for p in pinned(CARRY))
    assert set(pins) == set(CARRY)
    ours = dict(re.findall(r'"([\w-]+)==([^"]+)"', (REPO / "pyproject.toml").read_text()))  # the project's pins
    for name in ("trl", "transformers", "tokenizers", "peft", "accelerate", "datasets"):
        assert pins[name] == ours[name], name  # the GPU runs what CI tests


def test_liger_is_carried_at_the_gpu_extras_pin():
    from bench.device_wheels import gpu_extra

    (requirement,) = gpu_extra()  # pyproject.toml's `gpu` extra holds the one pin, for users and the bench
    assert re.fullmatch(r"liger-kernel==\d+(\.\d+)+", requirement), requirement  # exact, so the GPU runs what users get


def test_a_distribution_missing_here_stops_before_any_download():
    from bench.device_wheels import pinned

    with pytest.raises(SystemExit, match=r"not installed in this environment: no-such-dist-xyz"):
        pinned(["trl", "no-such-dist-xyz"])


def test_a_ratio_without_its_base_reads_n_a():
    from bench.throughput import ratio

    assert ratio(5.0, 2.0) == "2.50x"
    assert ratio(5.0, float("nan")) == "n/a"  # --variants without trl_default: the median of nothing


def test_steady_tokens_per_s_leaves_the_warm_up_steps_out():
    from bench.throughput import steady_tokens_per_s

    # step ends at (seconds, tokens so far): a 10 s first step (kernel compilation), then 1,000 tokens a second
    marks = [(10.0, 100), (11.0, 1100), (12.0, 2100), (13.0, 3100)]
    assert steady_tokens_per_s(marks, 1) == pytest.approx(1000.0)
    assert steady_tokens_per_s(marks, 4) is None  # no step left after the warm-up
    assert steady_tokens_per_s(marks, 0) is None  # the first step's start is not marked


def test_a_failing_variant_is_reported_and_the_others_still_run(capsys):
    """A variant that fails (out of memory on a GPU, a bad setting) must not lose the rest of a long GPU run;
    an ablation of train.batch_size trains with that batch instead of --batch."""
    from bench.throughput import main

    summary = main(["--shape", "tiny", "--steps", "2", "--repeats", "1", "--stages", "sft",
                    "--variants", "ours@attention=no-such-kernel", "ours@train.batch_size=2"])
    out = capsys.readouterr().out
    assert "ours@attention=no-such-kernel repeat 1: FAILED" in out and "sft.attention" in out
    (run,) = summary["sft"]["ours@train.batch_size=2"]["runs"]
    assert run["settings"]["batch_size"] == 2 and run["tokens"] > 0
    assert "ours@attention=no-such-kernel" not in summary["sft"]


def test_profile_dir_gets_a_table_of_the_steps_after_the_warm_up(tmp_path):
    from bench.throughput import main

    main(["--shape", "tiny", "--steps", "5", "--warmup-steps", "1", "--repeats", "1", "--stages", "cpt",
          "--variants", "ours", "--profile-dir", str(tmp_path)])
    (table,) = tmp_path.glob("*.txt")
    text = table.read_text()
    # the CPU memory window profiles steps 1-2 itself, so this one starts after them
    assert table.name == "cpt-ours.txt" and text.startswith("# steps 3-5") and "aten::mm" in text


def test_weights_trains_a_pretrained_folder_as_it_is_and_gives_the_lm_heads_share(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.throughput import main

    config = LlamaConfig(vocab_size=300, hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    summary = main(["--weights", str(tmp_path), "--max-length", "64", "--steps", "2", "--repeats", "1",
                    "--stages", "sft", "--variants", "ours"])
    (run,) = summary["sft"]["ours"]["runs"]
    assert run["params"] == sum(p.numel() for p in model.parameters())  # the folder's model, not a SHAPES one
    per_layer = 4 * 48 * 48 + 3 * 48 * 96  # q, k, v, o and the MLP's three matrices
    assert run["lm_head_share"] == pytest.approx(300 * 48 / (3 * per_layer + 300 * 48))
    assert f"the LM head is {round(100 * run['lm_head_share'])} % of a token's forward matmul FLOPs" in capsys.readouterr().out


def test_generation_bench_times_the_stages_decoding_next_to_a_plain_loop_with_equal_greedy_answers(lifecycle, capsys):
    from bench.generation import main

    results = main(["--workdir", str(lifecycle["workdir"]), "--max-per-suite", "2", "--rft-prompts", "2",
                    "--variants", "plain_loop", "ours"])
    by = {(r["workload"], r["variant"]): r for r in results}
    loop, ours = by["evaluate suites", "plain_loop"], by["evaluate suites", "ours"]
    assert loop["prompts"] == ours["prompts"] == 8 and loop["batch_size"] == 1
    assert ours["same_answers"] == "8/8" and ours["new_tokens"] == loop["new_tokens"] > 0  # greedy: the same tokens
    assert by["rft samples", "ours"]["k"] == 2 and by["rft samples", "ours"]["same_answers"] == "n/a (sampled)"
    assert "| evaluate suites | ours |" in capsys.readouterr().out
