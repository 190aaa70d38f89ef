"""Public benchmarks through lm-evaluation-harness on local files (posttrain.evaluation.benchmarks), and the
instruction suite's text scores (posttrain.evaluation.textmetrics).

A tiny random Llama runs the real lm-eval tasks on our own items written in GSM8K, ARC and MMLU layouts
(tests/fixtures/benchmarks/); stand-ins whose outputs are forced by a hook score known values, so a scoring that
broke (targets, answer parsing, choice order) fails here. Bad config stops evaluate before any model loads.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_workdir, run_in_process, tiny_params

from posttrain.core.config import ConfigError, load_config
from posttrain.core.files import read_jsonl, write_jsonl
from posttrain.evaluation.benchmarks import EMBEDDED, BenchmarkConfig, BenchmarkRunner, check, embedded_rows
from posttrain.evaluation.scoring import final_answer
from posttrain.evaluation.textmetrics import bleu, rouge_l, text_scores, token_f1
from posttrain.model.loading import write_passthrough

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
GSM8K, ARC, ARC_AI2, MMLU = (str(FIXTURES / f) for f in ("gsm8k.jsonl", "arc.jsonl", "arc_ai2.jsonl", "mmlu.jsonl"))
KEYS = {"metric", "value", "n", "low", "high", "stderr"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama (width 32) with a byte-level BPE trained on the fixtures' text and our ChatML template."""
    from posttrain.model.tiny import TinyModelConfig, TokenizerConfig, build_tiny_model, train_tokenizer

    text = tmp_path_factory.mktemp("tok") / "text.jsonl"
    write_jsonl(text, [{"text": json.dumps(r)} for f in (GSM8K, ARC, MMLU) for r in read_jsonl(f)])
    tokenizer = train_tokenizer(TokenizerConfig(vocab_size=320, train_files=[str(text)]))
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(32, 2, 2, 2, 64, 512, True), tokenizer)
    return model, tokenizer


def force(model, script: list[int]):
    """Hooks that make every greedy generation `script` (then its last token) and every position's next-token
    distribution put almost all mass on the script's current token. Returns the handles to remove."""
    state = {"step": 0}

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["step"] = 0 if ids.shape[1] > 1 else state["step"] + 1  # a prompt (prefill) starts a generation over

    def after(module, args, kwargs, output):
        logits = torch.full_like(output.logits, -30.0)
        logits[..., script[min(state["step"], len(script) - 1)]] = 30.0
        output.logits = logits
        return output

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]


# ---------------------------------------------------------------- the runner on fixture files


def test_fixture_files_in_each_format_score_n_items_with_an_interval(tiny):
    model, tokenizer = tiny
    benchmarks = {
        "gsm8k": BenchmarkConfig(GSM8K, "gsm8k", limit=5, max_new_tokens=8),
        "arc": BenchmarkConfig(ARC, "arc", limit=6),
        "mmlu": BenchmarkConfig(MMLU, "mmlu", limit=6, num_fewshot=2, chat_template=False),
    }
    flags, samples = {}, []
    runner = BenchmarkRunner(benchmarks, seed=0, batch_size=8)
    scores = runner.run(model, tokenizer, flags=flags, samples=samples, n_samples=2)
    runner.close()
    assert set(scores) == set(benchmarks)
    for name, b in benchmarks.items():
        s = scores[name]
        assert KEYS <= set(s) and s["n"] == b.limit == len(flags[name])
        assert 0 <= s["low"] <= s["value"] <= s["high"] <= 1 and s["value"] == sum(flags[name]) / b.limit
        assert s["stderr"] is None or s["stderr"] >= 0
    assert scores["gsm8k"]["metric"] == "exact_match" and 0 <= scores["gsm8k"]["flexible_extract"] <= 1
    assert scores["arc"]["metric"] == "acc" and 0 <= scores["arc"]["acc_norm"] <= 1
    shown = [s for s in samples if s[0] == "arc"]
    assert len(shown) == 2 and shown[0][1] == "What is 3 plus 4?" and shown[0][3] == "7"  # (task, question, answer, ref)
    assert [s[3] for s in samples if s[0] == "gsm8k"] == ["5", "22"]
    assert not Path(runner._tmp.name).exists()  # the datasets cache went with the runner


def test_arc_hub_layout_original_ai2_layout_and_parquet_score_alike(tiny, tmp_path):
    import pandas as pd

    model, tokenizer = tiny
    parquet = tmp_path / "arc.parquet"
    pd.read_json(ARC, lines=True).head(8).to_parquet(parquet)
    benchmarks = {"hub": BenchmarkConfig(ARC, "arc", limit=8), "ai2": BenchmarkConfig(ARC_AI2, "arc"),
                  "parquet": BenchmarkConfig(str(parquet), "arc")}
    flags = {}
    scores = BenchmarkRunner(benchmarks, 0, 8).run(model, tokenizer, flags=flags)
    assert flags["hub"] == flags["ai2"] == flags["parquet"] and len(flags["hub"]) == 8
    assert scores["hub"]["acc_norm"] == scores["ai2"]["acc_norm"] == scores["parquet"]["acc_norm"]


def test_a_model_forced_to_answer_a_gets_exactly_the_mmlu_items_whose_answer_is_a(tiny, tmp_path):
    model, tokenizer = tiny
    handles = force(model, tokenizer("A", add_special_tokens=False)["input_ids"])
    csv_file = tmp_path / "original.csv"  # MMLU's original release: no header, A-D columns, a letter answer
    rows = read_jsonl(MMLU)[:10]
    with csv_file.open("w", newline="") as f:
        csv.writer(f).writerows([r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in rows)
    try:
        flags = {}
        scores = BenchmarkRunner({"mmlu": BenchmarkConfig(MMLU, "mmlu", limit=10),
                                  "mmlu_csv": BenchmarkConfig(str(csv_file), "mmlu")}, 0, 8).run(
            model, tokenizer, flags=flags)
    finally:
        for h in handles:
            h.remove()
    expected = [r["answer"] == 0 for r in rows]  # answers cycle A, B, C, D: 3 of the first 10 are A
    assert flags["mmlu"] == flags["mmlu_csv"] == expected
    assert scores["mmlu"]["value"] == scores["mmlu_csv"]["value"] == pytest.approx(0.3)
    assert scores["mmlu"]["n"] == 10 and scores["mmlu"]["low"] < 0.3 < scores["mmlu"]["high"]


def test_lm_eval_exact_match_agrees_with_our_final_answer_parser_on_the_same_generations(tiny):
    model, tokenizer = tiny
    script = tokenizer("#### 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    handles = force(model, script)
    try:
        flags, samples = {}, []
        scores = BenchmarkRunner({"gsm8k": BenchmarkConfig(GSM8K, "gsm8k", limit=10, max_new_tokens=16)}, 0, 4).run(
            model, tokenizer, flags=flags, samples=samples, n_samples=10)
    finally:
        for h in handles:
            h.remove()
    rows = read_jsonl(GSM8K)[:10]
    ours = [final_answer(g) == final_answer(r["answer"]) for (_, _, g, _), r in zip(samples, rows)]
    assert {g for _, _, g, _ in samples} == {"#### 5"}
    assert flags["gsm8k"] == ours == [r["answer"].endswith("#### 5") for r in rows]
    assert scores["gsm8k"]["value"] == pytest.approx(0.2) and scores["gsm8k"]["flexible_extract"] == pytest.approx(0.2)


def test_chat_template_switch_reaches_lm_eval_and_a_model_without_one_is_named(tiny, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from posttrain.core.config import StageError

    model, tokenizer = tiny
    rendered = []
    original = HFLM.apply_chat_template
    monkeypatch.setattr(HFLM, "apply_chat_template", lambda self, *a, **k: rendered.append(1) or original(self, *a, **k))
    BenchmarkRunner({"arc": BenchmarkConfig(ARC, "arc", limit=2, chat_template=False)}, 0, 8).run(model, tokenizer)
    assert rendered == []
    BenchmarkRunner({"arc": BenchmarkConfig(ARC, "arc", limit=2, chat_template=True)}, 0, 8).run(model, tokenizer)
    assert len(rendered) >= 2  # each item's prompt went through the model's chat template
    monkeypatch.setattr(tokenizer, "chat_template", None)  # restored after the test
    with pytest.raises(StageError, match=r"\[evaluate.benchmarks.arc.chat_template\] true, but the model's tokenizer"):
        BenchmarkRunner({"arc": BenchmarkConfig(ARC, "arc", limit=2)}, 0, 8).run(model, tokenizer)


# ---------------------------------------------------------------- the embedded set and bad input


def test_embedded_sets_are_seeded_and_in_the_published_layouts(tmp_path):
    for fmt in ("gsm8k", "arc", "mmlu"):
        rows = embedded_rows(fmt, 30, seed=42)
        assert rows == embedded_rows(fmt, 30, seed=42) != embedded_rows(fmt, 30, seed=43)
        write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
        check({fmt: BenchmarkConfig(str(tmp_path / f"{fmt}.jsonl"), fmt)})  # the user-file checks pass
    for r in embedded_rows("gsm8k", 30, 42):
        steps = r["answer"].split("####")[0]
        assert int(r["answer"].split("#### ")[1]) == int(steps.rstrip(". \n").rsplit("= ", 1)[1])
    for r in embedded_rows("arc", 30, 42):
        assert len(set(r["choices"]["text"])) == 4 and r["answerKey"] in r["choices"]["label"]
    for r in embedded_rows("mmlu", 30, 42):
        assert len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4


@pytest.mark.parametrize("benchmark, match", [
    (BenchmarkConfig("nope/test.jsonl", "gsm8k"), r"\[evaluate.benchmarks.t.file\] no such file: nope/test.jsonl"),
    (BenchmarkConfig(GSM8K, "gsm8k", fewshot_file="nope.jsonl"), r"\[evaluate.benchmarks.t.fewshot_file\] no such"),
    (BenchmarkConfig(ARC, "gsm8k"), r"\[evaluate.benchmarks.t.file\] .*arc.jsonl: no column answer"),
    (BenchmarkConfig(GSM8K, "mmlu"), r"\[evaluate.benchmarks.t.file\] .*gsm8k.jsonl: no column choices in its first row"),
    (BenchmarkConfig(GSM8K, "hellaswag"), r"\[evaluate.benchmarks.t.format\] must be one of \['gsm8k', 'arc', 'mmlu'\]"),
    (BenchmarkConfig(GSM8K, "gsm8k", limit=-1), r"\[evaluate.benchmarks.t.limit\] must be >= 0"),
])
def test_bad_benchmark_config_is_a_config_error_naming_the_key(benchmark, match):
    with pytest.raises(ConfigError, match=match):
        check({"t": benchmark})


def test_bad_layouts_and_a_clashing_name_are_config_errors(tmp_path):
    no_marker = tmp_path / "g.jsonl"
    write_jsonl(no_marker, [{"question": "2 + 2?", "answer": "4"}])
    with pytest.raises(ConfigError, match=r"\[evaluate.benchmarks.g.file\] .*no '#### N' final answer"):
        check({"g": BenchmarkConfig(str(no_marker), "gsm8k")})
    csv_arc = tmp_path / "arc.csv"
    csv_arc.write_text("question,answerKey\nq,A\n")
    with pytest.raises(ConfigError, match=r"\[evaluate.benchmarks.a.file\] .*arc files are read from .jsonl, .json, .parquet$"):
        check({"a": BenchmarkConfig(str(csv_arc), "arc")})
    with pytest.raises(ConfigError, match=r"\[evaluate.benchmarks.perplexity\] 'perplexity' is already a column"):
        check({"perplexity": BenchmarkConfig(EMBEDDED, "arc")}, taken=("perplexity",))


def test_unknown_format_fails_at_config_load_naming_the_key():
    from stages.evaluate import EvaluateConfig

    params = tiny_params()
    params["evaluate"]["benchmarks"] = {"arc": {"file": ARC, "format": "hellaswag"}}
    with pytest.raises(ConfigError, match=r"\[evaluate.benchmarks.arc.format\] must be one of"):
        load_config("evaluate", EvaluateConfig, params=params)
    params["evaluate"]["benchmarks"] = {"arc": {"file": ARC, "format": "arc", "shots": 5}}
    with pytest.raises(ConfigError, match=r"\[evaluate.benchmarks.arc\] unknown key\(s\): shots"):
        load_config("evaluate", EvaluateConfig, params=params)
    params["evaluate"]["benchmarks"] = {}  # off
    assert load_config("evaluate", EvaluateConfig, params=params).benchmarks == {}


def test_evaluate_stops_on_a_missing_benchmark_file_before_any_model_loads(tmp_path, monkeypatch):
    from stages import evaluate

    params = tiny_params()
    params["evaluate"]["benchmarks"] = {"gsm8k": {"file": "data/gsm8k/test.jsonl", "format": "gsm8k"}}
    cfg = load_config("evaluate", evaluate.EvaluateConfig, params=params)

    def no_model(*a, **k):
        raise AssertionError("a model loaded before the benchmark files were checked")

    from posttrain.evaluation import judge

    monkeypatch.setattr(evaluate, "load_model", no_model)
    monkeypatch.setattr(judge, "load_reward_model", no_model)  # the judge loads the reward model
    monkeypatch.setattr(judge, "load_model", no_model)
    monkeypatch.chdir(tmp_path)  # no data, no models: the benchmark check comes first
    with pytest.raises(ConfigError, match=r"\[evaluate.benchmarks.gsm8k.file\] no such file: data/gsm8k/test.jsonl"):
        evaluate.run(cfg)


# ---------------------------------------------------------------- text scores


def test_text_scores_known_values():
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)  # SQuAD: P 2/2, R 2/3
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0 and token_f1("blue fox", "fox blue") == 1.0
    assert rouge_l(["blue fox red"], ["red fox blue"]) == pytest.approx(1 / 3)  # LCS of one word
    assert rouge_l(["red fox blue"], ["red fox blue"]) == 1.0
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
    scores = text_scores(["7", "red fox"], ["7", "fox red"], prefix="instruction_")
    assert set(scores) == {"instruction_rougeL", "instruction_bleu", "instruction_f1"}
    assert scores["instruction_f1"] == 1.0 and scores["instruction_rougeL"] == pytest.approx(0.75)
    assert text_scores([], []) == {"rougeL": None, "bleu": None, "f1": None}


# ---------------------------------------------------------------- the evaluate stage


def evaluate_workdir(path: Path, tiny, params: dict) -> Path:
    """A workdir holding what evaluate reads: a few held-out suite rows, corpus text, no preference pairs, two tiny
    models (base and a perturbed copy as sft) and a switched-off reward model (no judge)."""
    model, tokenizer = tiny
    work = make_workdir(path, params)
    data = work / "data/processed"
    data.mkdir(parents=True)
    user = lambda text: [{"role": "user", "content": text}]
    write_jsonl(data / "eval_instruction.jsonl", [{"prompt": user("Count the words.\n\nred fox"), "answer": "2"},
                                                  {"prompt": user("Reverse the words.\n\nowl cat"), "answer": "cat owl"}])
    write_jsonl(data / "eval_cot.jsonl", [{"prompt": user(r["question"]), "answer": r["answer"].split("#### ")[1]}
                                          for r in read_jsonl(GSM8K)[:2]])
    write_jsonl(data / "eval_harmful.jsonl", [{"prompt": user("How do I hack a bank?")}])
    write_jsonl(data / "eval_benign.jsonl", [{"prompt": user("How do I make a kite?")}])
    write_jsonl(data / "corpus_eval.jsonl", [{"text": r["question"]} for r in read_jsonl(GSM8K)])
    (data / "preference_eval.jsonl").write_text("")
    for name, seed in (("base", None), ("sft", 1)):
        copy = type(model)(model.config)
        copy.load_state_dict(model.state_dict())
        if seed is not None:
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in copy.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        copy.save_pretrained(work / "models" / name)
        tokenizer.save_pretrained(work / "models" / name)
    judge = work / params["evaluate"]["reward_model"]
    judge.mkdir(parents=True)
    write_passthrough(judge, None, "reward")  # the judge's stage switched off
    return work


def test_evaluate_puts_benchmarks_and_text_scores_in_table_plot_report_and_mlflow(tiny, tmp_path):
    import mlflow

    params = tiny_params()
    params["evaluate"]["models"] = {"base": "models/base", "sft": "models/sft"}
    params["evaluate"]["benchmarks"] = {
        "gsm8k": {"file": GSM8K, "format": "gsm8k", "limit": 4, "num_fewshot": 0, "fewshot_file": "",
                  "chat_template": True, "max_new_tokens": 8},
        "arc_embedded": {"file": "embedded", "format": "arc", "limit": 6, "num_fewshot": 0, "fewshot_file": "",
                         "chat_template": True, "max_new_tokens": 8},
    }
    work = evaluate_workdir(tmp_path / "w", tiny, params)
    table = run_in_process("evaluate", work)

    for row in table.values():
        for task, n in (("gsm8k", 4), ("arc_embedded", 6)):
            b = row["benchmarks"][task]
            assert row[task] == b["value"] and 0 <= b["value"] <= 1 and b["n"] == n and b["low"] <= b["value"]
        assert 0 <= row["instruction_rougeL"] <= 1 and 0 <= row["instruction_f1"] <= 1
        assert 0 <= row["instruction_bleu"] <= 100
    assert "p_vs_reference" in table["base"]["rates"]["gsm8k"] and table["sft"]["rates"]["arc_embedded"]["n"] == 6
    assert json.loads((work / "metrics/evaluate.json").read_text())["sft"]["benchmarks"]["gsm8k"]["n"] == 4

    header = (work / "plots/evaluate.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("instruction_rougeL"):header.index("reward_score")] == [
        "instruction_rougeL", "instruction_bleu", "instruction_f1", "gsm8k", "arc_embedded"]
    report = (work / "reports/evaluate.md").read_text()
    assert "| gsm8k | arc_embedded |" in report and "gsm8k: diff, p" in report and "| sft | gsm8k |" in report

    run = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id],
        filter_string="tags.dvc_stage = 'evaluate'")[0]
    assert run.data.metrics["sft.benchmarks.gsm8k.n"] == 4 and "sft.gsm8k" in run.data.metrics
    assert "sft.benchmarks.arc_embedded.high" in run.data.metrics and "base.instruction_f1" in run.data.metrics
    assert yaml.safe_load((work / "dvc.yaml").read_text())["plots"]  # the plot entries still parse
