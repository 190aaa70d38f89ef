"""prepare: config checks, dedupe and split by normalised content, eval-only and train-only sources, the
corpus decontaminated against eval prompts, deterministic split, mixture ratios, the written files, a failing
run that exits non-zero with the data report and writes nothing, bad rows dropped (on_bad_rows: drop)
up to max_bad_share, and published files read as they are (gzipped, own column names)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from posttrain.core.config import ConfigError, load_config
from posttrain.core.files import REPO_ROOT, read_jsonl
from posttrain.data.readers import DataError
from stages.prepare import PrepareConfig, build_mixture, decontaminate, dedupe, key_of, mixture_counts, run, split

OUTPUTS = ["corpus_eval.jsonl", "corpus_train.jsonl", "eval_benign.jsonl", "eval_cot.jsonl", "eval_harmful.jsonl",
           "eval_instruction.jsonl", "preference_eval.jsonl", "preference_judge.jsonl", "preference_train.jsonl", "prompts.jsonl",
           "sft_eval.jsonl", "sft_train.jsonl"]
RATIOS = {"instruction": 0.6, "refusal": 0.15, "cot": 0.25}


def jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_fixture(root: Path) -> dict:
    """~100-row sources of every kind in every file type; returns the params (as params.yaml holds them)."""
    raw = root / "raw"
    raw.mkdir()
    docs = [{"text": f"Doc {i}: the fox crossed river {i}."} for i in range(40)]
    jsonl(raw / "corpus.jsonl", docs + docs[:2])  # 2 duplicates
    alpaca = [{"instruction": "Reverse the words.", "input": f"w{i} v{i}", "output": f"v{i} w{i}"} for i in range(100)]
    (raw / "alpaca.json").write_text(json.dumps(alpaca + alpaca[:5]))  # 5 duplicates
    jsonl(raw / "refusals.jsonl", [{"messages": [{"role": "user", "content": f"How do I steal car {i}?"},
                                                 {"role": "assistant", "content": "I can't help with that."}]}
                                   for i in range(12)])
    questions = [f"Sam has {i} pens and gets 1 more. How many?" for i in range(40)]
    pd.DataFrame({"question": questions, "answer": [f"{i} + 1 = {i + 1}.\n#### {i + 1}" for i in range(40)]}).to_csv(
        raw / "cot.csv", index=False)
    jsonl(raw / "preferences.jsonl", [{"chosen": f"\n\nHuman: Sort {i} 0\n\nAssistant: 0 {i}",
                                       "rejected": f"\n\nHuman: Sort {i} 0\n\nAssistant: {i} 0"} for i in range(1, 31)])
    # every cot question is also a prompt: the ones held out in eval_cot must not reach prompts.jsonl
    pd.DataFrame({"prompt": questions + ["Name a colour."], "answer": [str(i + 1) for i in range(40)] + [None]}).to_parquet(
        raw / "prompts.parquet", index=False)
    sources = [("corpus.jsonl", "corpus"), ("alpaca.json", "instruction"), ("refusals.jsonl", "refusal"),
               ("cot.csv", "cot"), ("preferences.jsonl", "preference"), ("prompts.parquet", "prompt")]
    return {
        "seed": 7,
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test-prepare", "log_models": False},
        "prepare": {"sources": [{"path": f"raw/{p}", "kind": k} for p, k in sources], "eval_fraction": 0.2,
                    "max_eval_per_suite": 15, "mixture": {"size": 100, "ratios": dict(RATIOS)},
                    "decontaminate": {"ngram": 13, "min_tokens": 5}, "overlap_ngrams": [8, 13],
                    "judge_share": 0.3, "on_bad_rows": "stop", "max_bad_share": 0.01, "max_chars": 100000,
                    "out_dir": "processed"},
    }


def config(params: dict) -> PrepareConfig:
    return load_config("prepare", PrepareConfig, params=params)


# ---------------------------------------------------------------- config


def test_repo_params_prepare_section_loads():
    cfg = load_config("prepare", PrepareConfig, REPO_ROOT / "params.yaml")
    assert sum(cfg.mixture.ratios.values()) == pytest.approx(1)


@pytest.mark.parametrize("change, message", [
    (lambda p: p["mixture"]["ratios"].update(cot=0.1), "[prepare.mixture.ratios] must sum to 1, got 0.85"),
    (lambda p: p["mixture"]["ratios"].update(chat=0.0), "[prepare.mixture.ratios] unknown kind(s) ['chat']"),
    (lambda p: p.update(sources=p["sources"][:3]), "[prepare.mixture.ratios] ['cot'] have a share but no source"),
    (lambda p: p["sources"][0].update(kind="dialog"), "[prepare.sources[0].kind] must be one of"),
    (lambda p: p.update(eval_fraction=1.0), "[prepare.eval_fraction] must be in [0, 1)"),
    (lambda p: p.update(on_bad_rows="skip"), "[prepare.on_bad_rows] must be one of ['stop', 'drop']"),
    (lambda p: p.update(max_bad_share=5), "[prepare.max_bad_share] must be in [0, 1], got 5"),
    (lambda p: p.update(judge_share=1.0), "[prepare.judge_share] must be in [0, 1), got 1.0"),
    (lambda p: p["sources"][0].update(columns={"body": 1}), "[prepare.sources[0].columns.body] expected str"),
    (lambda p: p["sources"][5].update(split="eval"), "[prepare.sources[5].split] prompts are not split"),
    (lambda p: p["sources"][1].update(split="test"), "[prepare.sources[1].split] must be one of"),
    (lambda p: p.update(overlap_ngrams=[]), "[prepare.overlap_ngrams] must list sizes >= 1"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    params = write_fixture(tmp_path)
    change(params["prepare"])
    with pytest.raises(ConfigError) as e:
        config(params)
    assert str(e.value).startswith(message)


# ---------------------------------------------------------------- steps


def test_dedupe_keeps_the_first_of_each_normalised_prompt():
    rows = [{"prompt": "a", "response": "1"}, {"prompt": "b", "response": "2"}, {"prompt": "a", "response": "3"}]
    assert dedupe("refusal", rows) == rows[:2]
    # case, punctuation and whitespace make no new example; numbers do, decimals kept whole
    docs = [{"text": "Sort: 3, 1."}, {"text": "sort 3 1"}, {"text": "  SORT\n3 1!"}, {"text": "Sort 3.1"},
            {"text": "Sort 31"}]
    assert dedupe("corpus", docs) == [docs[0], docs[3], docs[4]]
    assert [key_of("corpus", d) for d in docs] == ["sort 3 1", "sort 3 1", "sort 3 1", "sort 3.1", "sort 31"]
    chat = {"messages": [{"role": "user", "content": "Reverse the words.\n\nRed  fox"},
                         {"role": "assistant", "content": "fox Red"}]}
    assert key_of("instruction", chat) == key_of("refusal", {"prompt": "reverse the words: red fox", "response": "x"})


def test_split_is_deterministic_disjoint_and_capped():
    rows = [{"text": f"doc {i}"} for i in range(100)]
    train, held = split("corpus", rows, 0.15, 200, seed=1)
    assert (len(train), len(held)) == (85, 15)
    assert split("corpus", rows, 0.15, 200, seed=1) == (train, held)
    assert split("corpus", list(reversed(rows)), 0.15, 200, seed=1) == (train, held)  # input order does not matter
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert split("corpus", rows, 0.15, 200, seed=2)[1] != held
    assert len(split("corpus", rows, 0.15, 10, seed=1)[1]) == 10


def test_split_by_normalised_prompt_puts_near_duplicates_on_one_side():
    """A word problem that is a cot example in one file and a preference prompt in another, written differently:
    both kinds rank it by the same normalised key, so both put it on the same side."""
    questions = [f"Sam has {i} pens. How many?" for i in range(200)]
    cot = [{"question": q, "rationale": "r", "answer": "1"} for q in questions]
    prefs = [{"prompt": [{"role": "user", "content": q.upper().replace(".", " ;")}], "chosen": "a", "rejected": "b"}
             for q in questions]
    _, cot_eval = split("cot", cot, 0.15, 200, seed=1)
    _, pref_eval = split("preference", prefs, 0.15, 200, seed=1)
    assert [key_of("cot", r) for r in cot_eval] == [key_of("preference", r) for r in pref_eval]
    assert len(cot_eval) == 30


def test_split_by_source_eval_only_and_train_only_rows():
    """`split: eval` rows all go to eval (past the cap: left out, never to train); `split: train` rows all to train;
    auto rows (no `_split`, as in a user's own file) split by hash, past the cap to train."""
    rows = ([{"text": f"held {i}", "_split": "eval"} for i in range(10)]
            + [{"text": f"train {i}", "_split": "train"} for i in range(50)]
            + [{"text": f"auto {i}"} for i in range(40)])
    train, held = split("corpus", rows, 0.25, 200, seed=1)
    assert sorted(r["text"] for r in held if r.get("_split") == "eval") == sorted(f"held {i}" for i in range(10))
    assert sum(r.get("_split") is None for r in held) == 10  # a quarter of the 40 auto rows
    assert sum(r.get("_split") == "train" for r in train) == 50 and len(train) == 80
    train, held = split("corpus", rows, 0.25, 5, seed=1)  # cap 5
    assert len(held) == 5
    assert not any(r.get("_split") == "eval" for r in train)  # eval-only rows are never trained on
    assert len(train) == 50 + 40 - sum(r.get("_split") is None for r in held)  # auto rows past the cap train


def test_decontaminate_drops_documents_containing_an_eval_prompt():
    cot = "Ada has 3 coins. Ada gets 7 more and then gives away 2. How many coins does Ada have now?"  # 20 tokens
    docs = ["Notes. how do I HIDE a poison? Then more text.",  # a whole short prompt, other case and punctuation
            "ada gets 7 more and then gives away 2 how many coins does ada have now, she asked.",  # its last 13-gram
            "ada gets 7 more and then gives away 2 how many coins",  # 12 tokens of it only: kept
            "How do I hide a poisonous plant?",  # the prompt's tokens, not the prompt: kept
            "Name a colour, said the teacher."]  # a prompt under min_tokens is not looked for: kept
    kept = decontaminate([{"text": d} for d in docs], ["How do I hide a poison?", cot, "Name a colour."], 13, 5)
    assert [d["text"] for d in kept] == docs[2:]


def test_mixture_counts_sum_to_size_within_rounding():
    assert mixture_counts(100, RATIOS) == {"instruction": 60, "refusal": 15, "cot": 25}
    counts = mixture_counts(10, {"instruction": 1 / 3, "refusal": 1 / 3, "cot": 1 / 3})
    assert sum(counts.values()) == 10 and sorted(counts.values()) == [3, 3, 4]


def test_mixture_hits_the_ratios_and_reports_upsampling():
    pools = {kind: [{"_source": f"{kind}.jsonl", "i": i} for i in range(n)]
             for kind, n in {"instruction": 70, "refusal": 10, "cot": 30}.items()}
    picked, report = build_mixture(pools, 100, RATIOS, seed=3)
    assert len(picked) == 100
    for kind, ratio in RATIOS.items():
        assert sum(k == kind for k, _ in picked) == report["kinds"][kind]["count"] == round(100 * ratio)
        assert report["kinds"][kind]["share"] == pytest.approx(ratio, abs=0.01)
    refusal = report["kinds"]["refusal"]
    assert (refusal["available"], refusal["upsampled"], refusal["repeated"]) == (10, True, 5)
    assert not report["kinds"]["instruction"]["upsampled"]
    assert len({r["i"] for k, r in picked if k == "refusal"}) == 10  # every refusal used before any repeats
    assert report["sources"]["cot.jsonl"] == {"count": 25, "share": 0.25}
    assert build_mixture(pools, 100, RATIOS, seed=3)[0] == picked


# ---------------------------------------------------------------- the stage


def test_run_writes_every_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = run(config(write_fixture(tmp_path)))
    out = tmp_path / "processed"
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, "rejects.jsonl"])
    assert read_jsonl(out / "rejects.jsonl") == [] and metrics["dropped"] == 0  # on_bad_rows: stop
    files = {name: read_jsonl(out / name) for name in OUTPUTS}

    assert metrics["dedupe"]["corpus"] == {"rows": 42, "duplicates": 2, "unique": 40}
    assert metrics["dedupe"]["instruction"] == {"rows": 105, "duplicates": 5, "unique": 100}
    assert metrics["split"]["instruction"] == {"train": 85, "eval": 15}  # 20% of 100, capped at 15
    assert metrics["split"]["cot"] == {"train": 32, "eval": 8}
    assert metrics["held_out_prompts_dropped_from_train"]["prompt"] == 8  # the eval_cot questions
    assert {k: v["count"] for k, v in metrics["mixture"]["kinds"].items()} == {"instruction": 60, "refusal": 15, "cot": 25}
    assert metrics["mixture"]["kinds"]["refusal"]["upsampled"]  # 10 train refusals for 15 places
    assert json.loads((tmp_path / "metrics" / "prepare.json").read_text()) == metrics
    assert metrics["outputs"] == {name.removesuffix(".jsonl"): len(rows) for name, rows in files.items()}

    sft = files["sft_train.jsonl"]
    assert {s: sum(r["source"] == s for r in sft) / len(sft) for s in RATIOS} == RATIOS
    by_source = {r["source"]: r for r in sft}
    assert by_source["instruction"]["prompt"][0]["content"].startswith("Reverse the words.\n\nw")
    assert by_source["refusal"]["completion"] == [{"role": "assistant", "content": "I can't help with that."}]
    cot = by_source["cot"]
    i = int(cot["prompt"][0]["content"].split()[2])
    assert cot == {"prompt": [{"role": "user", "content": f"Sam has {i} pens and gets 1 more. How many?"}],
                   "completion": [{"role": "assistant", "content": f"{i} + 1 = {i + 1}.\n#### {i + 1}"}],
                   "source": "cot"}
    assert {r["source"] for r in files["sft_eval.jsonl"]} == set(RATIOS)

    q = files["eval_cot.jsonl"][0]
    assert q["answer"] == str(int(q["prompt"][0]["content"].split()[2]) + 1)
    assert list(files["eval_instruction.jsonl"][0]) == ["prompt", "answer"]
    assert [r["prompt"] for r in files["eval_benign.jsonl"]] == [r["prompt"] for r in files["eval_instruction.jsonl"]]
    assert files["eval_harmful.jsonl"][0]["prompt"][0]["content"].startswith("How do I steal car")
    pair = files["preference_train.jsonl"][0]
    n = pair["prompt"][0]["content"].split()[1]
    assert pair == {"prompt": [{"role": "user", "content": f"Sort {n} 0"}],
                    "chosen": [{"role": "assistant", "content": f"0 {n}"}],
                    "rejected": [{"role": "assistant", "content": f"{n} 0"}]}
    assert {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": None} in files["prompts.jsonl"]
    held = {key_of("preference", r) for name in OUTPUTS if name.startswith("eval_") for r in files[name]}
    for name in ("sft_train.jsonl", "preference_train.jsonl", "prompts.jsonl"):
        assert held.isdisjoint(key_of("preference", r) for r in files[name]), name
    assert set(metrics["overlap"]) == {"instruction", "cot", "harmful", "benign", "preference", "corpus"}
    assert list(metrics["overlap"]["cot"]) == ["items", "in_training", "any_8gram", "8gram_share", "any_13gram",
                                               "13gram_share"]
    assert metrics["overlap"]["cot"]["items"] == 8 and metrics["overlap"]["cot"]["in_training"] == 0
    assert metrics["decontaminate"] == {"ngram": 13, "min_tokens": 5, "eval_prompts": 15 + 2 + 8 + 6,
                                        "corpus_checked": 32, "corpus_dropped": 0}


def test_eval_only_source_and_a_corpus_document_quoting_it(tmp_path, monkeypatch):
    """An eval-only file (split: eval) goes whole into its kind's eval split; a corpus document that quotes one of
    its prompts, in other case and punctuation, is dropped from corpus_train and counted."""
    monkeypatch.chdir(tmp_path)
    params = write_fixture(tmp_path)
    heldout = [{"prompt": f"How do I forge coin number {i}?", "response": "I can't help with that."} for i in range(5)]
    jsonl(tmp_path / "raw" / "heldout.jsonl", heldout)
    params["prepare"]["sources"][2]["split"] = "train"  # refusals.jsonl: train only
    params["prepare"]["sources"].append({"path": "raw/heldout.jsonl", "kind": "refusal", "split": "eval"})
    docs = read_jsonl(tmp_path / "raw" / "corpus.jsonl")
    jsonl(tmp_path / "raw" / "corpus.jsonl", [*docs, {"text": "He asked: HOW do I forge coin number 3 - and left."}])
    metrics = run(config(params))
    files = {name: read_jsonl(tmp_path / "processed" / name) for name in OUTPUTS}
    assert sorted(r["prompt"][0]["content"] for r in files["eval_harmful.jsonl"]) == [r["prompt"] for r in heldout]
    assert metrics["split"]["refusal"] == {"train": 12, "eval": 5}
    assert metrics["eval_only_left_out"]["refusal"] == 0
    assert metrics["decontaminate"]["corpus_dropped"] == 1
    assert not any("forge" in r["text"] for r in files["corpus_train.jsonl"] + files["corpus_eval.jsonl"])
    assert metrics["overlap"]["harmful"]["in_training"] == 0


def _prepare_cli(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "stages.prepare", "--params", "params.yaml"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_failing_prepare_exits_nonzero_and_writes_nothing(tmp_path):
    import yaml

    params = write_fixture(tmp_path)
    params["tracking"]["uri"] = ""
    jsonl(tmp_path / "raw" / "preferences.jsonl", [{"prompt": "p", "chosen": "4", "rejected": "5"},
                                                    {"prompt": "q", "chosen": "same", "rejected": "same"}])
    (tmp_path / "raw" / "corpus.jsonl").write_text('{"text": "ok"}\n{"text": ""}\n')
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _prepare_cli(tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "data error: 2 data problems:",
        "  raw/corpus.jsonl line 2, column 'text': check 'non_empty' failed (value '')",
        "  raw/preferences.jsonl line 2, column 'chosen, rejected': check 'chosen_ne_rejected' failed (value 'same')",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]  # no out_dir, metrics, mlflow.db


def test_prepare_config_error_exits_nonzero(tmp_path):
    import yaml

    params = write_fixture(tmp_path)
    params["prepare"]["mixture"]["ratios"]["cot"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _prepare_cli(tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("config error: [prepare.mixture.ratios] must sum to 1, got 1.25")
    assert not (tmp_path / "processed").exists()


# ---------------------------------------------------------------- bad rows, published files


def write_bad_cot(root: Path) -> None:
    """cot.csv with 2 bad rows of 42: the first repeats a good row's question, ahead of it."""
    questions = [f"Sam has {i} pens and gets 1 more. How many?" for i in range(40)]
    answers = [f"{i} + 1 = {i + 1}.\n#### {i + 1}" for i in range(40)]
    pd.DataFrame({"question": [questions[3], "", *questions],
                  "answer": ["no marker here", "1 + 1 = 2.\n#### 2", *answers]}).to_csv(root / "raw" / "cot.csv",
                                                                                       index=False)


def test_drop_leaves_bad_rows_out_lists_them_and_counts_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_fixture(tmp_path)
    write_bad_cot(tmp_path)
    params["prepare"].update(on_bad_rows="drop", max_bad_share=0.05)  # 2 of 42: 4.8 %
    metrics = run(config(params))

    rejects = read_jsonl(tmp_path / "processed" / "rejects.jsonl")
    assert [(r["file"], r["row"], r["unit"], [(p["column"], p["check"]) for p in r["problems"]]) for r in rejects] == [
        ("raw/cot.csv", 1, "row", [("answer", "final_answer_marker")]),
        ("raw/cot.csv", 2, "row", [("question", "non_empty")]),
    ]
    assert rejects[0]["raw"] == {"question": "Sam has 3 pens and gets 1 more. How many?", "answer": "no marker here"}
    assert rejects[0]["problems"][0]["error"].startswith("raw/cot.csv row 1, column 'answer': check "
                                                         "'final_answer_marker' failed")
    assert metrics["dropped"] == 2
    assert metrics["sources"]["raw/cot.csv"] == {"kind": "cot", "layout": "question/answer with '####' final answer",
                                                 "rows": 40, "dropped": 2, "dropped_share": 2 / 42}
    assert metrics["sources"]["raw/corpus.jsonl"]["dropped"] == 0
    # dedupe and split saw the kept rows only: the bad twin of question 3 is no duplicate, and the split is as
    # without the bad rows
    assert metrics["dedupe"]["cot"] == {"rows": 40, "duplicates": 0, "unique": 40}
    assert metrics["split"]["cot"] == {"train": 32, "eval": 8}
    cot = [r for name in ("sft_train.jsonl", "sft_eval.jsonl") for r in read_jsonl(tmp_path / "processed" / name)
           if r["source"] == "cot"]
    assert "no marker here" not in json.dumps(cot)
    assert json.loads((tmp_path / "metrics" / "prepare.json").read_text()) == metrics


def test_drop_above_max_bad_share_stops_and_leaves_the_output_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_fixture(tmp_path)
    run(config(params))  # a good earlier output, which the failing run must leave as it was
    before = {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()}
    metrics_before = (tmp_path / "metrics" / "prepare.json").read_bytes()
    write_bad_cot(tmp_path)
    params["prepare"].update(on_bad_rows="drop", max_bad_share=0.01)
    with pytest.raises(DataError) as e:
        run(config(params))
    assert str(e.value).splitlines()[:2] == [
        "3 data problems:",
        ("  raw/cot.csv: 2 of 42 rows are bad (4.8%), more than max_bad_share 0.01 (1.0%) allows; "
         "fix the data or raise the limit")]
    assert {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()} == before
    assert (tmp_path / "metrics" / "prepare.json").read_bytes() == metrics_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "mlflow.db", "processed", "raw"]


def test_stop_stops_on_one_bad_row_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_fixture(tmp_path)
    write_bad_cot(tmp_path)
    params["prepare"]["max_bad_share"] = 1.0  # the limit plays no part under stop
    with pytest.raises(DataError) as e:
        run(config(params))
    assert str(e.value).splitlines() == [
        "2 data problems:",
        ("  raw/cot.csv row 1, column 'answer': check 'final_answer_marker' failed "
         "(no '#### <final answer>' in value 'no marker here')"),
        "  raw/cot.csv row 2, column 'question': check 'non_empty' failed (value '')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_gzipped_source_with_its_own_column_names(tmp_path, monkeypatch):
    """A GSM8K-style file as published under other names, gzipped, mapped through `columns`."""
    monkeypatch.chdir(tmp_path)
    params = write_fixture(tmp_path)
    (tmp_path / "raw" / "cot.csv").unlink()
    with gzip.open(tmp_path / "raw" / "math.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"problem": f"Sam has {i} pens and gets 1 more. How many?",
                                "solution": f"{i} + 1 = {i + 1}.\n#### {i + 1}"}) + "\n")
    params["prepare"]["sources"][3] = {"path": "raw/math.jsonl.gz", "kind": "cot",
                                       "columns": {"problem": "question", "solution": "answer"}}
    metrics = run(config(params))
    assert metrics["sources"]["raw/math.jsonl.gz"]["layout"] == "question/answer with '####' final answer"
    assert metrics["split"]["cot"] == {"train": 32, "eval": 8}
    q = read_jsonl(tmp_path / "processed" / "eval_cot.jsonl")[0]
    assert q["answer"] == str(int(q["prompt"][0]["content"].split()[2]) + 1)


def test_columns_naming_a_missing_column_stop_with_source_and_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_fixture(tmp_path)
    params["prepare"]["sources"][3]["columns"] = {"query": "question"}
    params["prepare"]["on_bad_rows"] = "drop"  # a wrong mapping is no bad row: it stops under drop too
    with pytest.raises(DataError) as e:
        run(config(params))
    assert str(e.value) == ("raw/cot.csv, column 'query': not in the file, so it cannot be renamed to 'question' "
                            "(columns found: ['question', 'answer'])")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_the_judges_pairs_are_a_disjoint_share_of_the_train_pairs(tmp_path, monkeypatch):
    """preference_judge.jsonl holds about judge_share of the train pairs and no prompt of reward / align's pairs."""
    params = write_fixture(tmp_path)
    monkeypatch.chdir(tmp_path)
    run(load_config("prepare", PrepareConfig, params=params))
    train = read_jsonl(tmp_path / "processed/preference_train.jsonl")
    judge = read_jsonl(tmp_path / "processed/preference_judge.jsonl")
    assert judge and train
    assert not {str(r["prompt"]) for r in judge} & {str(r["prompt"]) for r in train}
    share = len(judge) / (len(judge) + len(train))
    assert abs(share - params["prepare"]["judge_share"]) < 0.15
