"""Readers: every layout and file type into exact canonical rows; every problem named precisely."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from posttrain.data.readers import DataError, read_source, read_sources, transcript_messages


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def canonical(table) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in table.rows]


def error(path: Path, kind: str) -> str:
    with pytest.raises(DataError) as e:
        read_source(path, kind)
    return str(e.value)


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def S(text: str) -> dict:
    return {"role": "system", "content": text}


# ---------------------------------------------------------------- instruction layouts


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Reverse the words.", "input": "red fox", "output": "fox red"},
        {"instruction": "What is 2 plus 3?", "input": "", "output": "5", "system": "Be brief."},
    ]))
    table = read_source(path, "instruction")
    assert table.layout == "alpaca"
    assert canonical(table) == [
        {"messages": [U("Reverse the words.\n\nred fox"), A("fox red")]},
        {"messages": [S("Be brief."), U("What is 2 plus 3?"), A("5")]},
    ]
    assert [(r["_source"], r["_row"]) for r in table.rows] == [(str(path), 1), (str(path), 2)]


def test_alpaca_json_data_wrapper_without_input_column(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps({"data": [{"instruction": "Say hi.", "output": "hi"}]}))
    assert canonical(read_source(path, "instruction")) == [{"messages": [U("Say hi."), A("hi")]}]


def test_sharegpt_jsonl_both_role_spellings(tmp_path):
    path = jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]},
        {"conversations": [{"from": "user", "value": "Sort 2 1"}, {"from": "assistant", "value": "1 2"}]},
    ])
    table = read_source(path, "instruction")
    assert table.layout == "sharegpt"
    assert canonical(table) == [{"messages": [S("Be kind."), U("Hi"), A("Hello!")]},
                                {"messages": [U("Sort 2 1"), A("1 2")]}]


def test_openai_messages_as_instruction_and_as_refusal(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [S("Be safe."), U("How do I make a bomb?"), A("I can't help with that request.")]},
    ])
    assert canonical(read_source(path, "instruction")) == [
        {"messages": [S("Be safe."), U("How do I make a bomb?"), A("I can't help with that request.")]}]
    assert canonical(read_source(path, "refusal")) == [
        {"prompt": "How do I make a bomb?", "response": "I can't help with that request."}]


def test_prompt_response_and_prompt_completion_csv(tmp_path):
    pd.DataFrame({"prompt": ["Count the words.\n\nred fox"], "response": ["2"]}).to_csv(tmp_path / "pr.csv", index=False)
    pd.DataFrame({"prompt": ["Rob a store."], "completion": ["No."]}).to_csv(tmp_path / "pc.csv", index=False)
    assert canonical(read_source(tmp_path / "pr.csv", "instruction")) == [
        {"messages": [U("Count the words.\n\nred fox"), A("2")]}]
    table = read_source(tmp_path / "pc.csv", "refusal")
    assert table.layout == "prompt/completion"
    assert canonical(table) == [{"prompt": "Rob a store.", "response": "No."}]


def test_trl_conversational_prompt_completion(tmp_path):
    path = jsonl(tmp_path / "pc.jsonl", [{"prompt": [U("Hi")], "completion": [A("Hello")]}])
    assert canonical(read_source(path, "instruction")) == [{"messages": [U("Hi"), A("Hello")]}]


# ---------------------------------------------------------------- preference layouts


def test_prompt_chosen_rejected_strings(tmp_path):
    path = jsonl(tmp_path / "pref.jsonl", [{"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"}])
    table = read_source(path, "preference")
    assert table.layout == "prompt/chosen/rejected"
    assert canonical(table) == [{"prompt": [U("What is 2 plus 2?")], "chosen": "4", "rejected": "5"}]


def test_message_list_pairs_share_their_prompt_parquet(tmp_path):
    path = tmp_path / "pref.parquet"
    pd.DataFrame({
        "chosen": [[S("Be brief."), U("Hi"), A("Hello")]],
        "rejected": [[S("Be brief."), U("Hi"), A("Go away")]],
    }).to_parquet(path, index=False)
    assert canonical(read_source(path, "preference")) == [
        {"prompt": [S("Be brief."), U("Hi")], "chosen": "Hello", "rejected": "Go away"}]


def test_explicit_prompt_with_message_list_replies(tmp_path):
    path = jsonl(tmp_path / "pref.jsonl", [
        {"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [U("Hi"), A("Go away")]}])
    assert canonical(read_source(path, "preference")) == [{"prompt": [U("Hi")], "chosen": "Hello", "rejected": "Go away"}]


def test_whole_transcript_pairs_split_at_the_last_assistant_turn(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Count the words.\n\nred fox"
    path = jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + "\n\nAssistant: 2", "rejected": shared + "\n\nAssistant: 3"}])
    table = read_source(path, "preference")
    assert table.layout == "chosen/rejected with a shared prompt"
    assert canonical(table) == [{"prompt": [U("Hi"), A("Hello!"), U("Count the words.\n\nred fox")],
                                 "chosen": "2", "rejected": "3"}]


def test_transcript_messages():
    assert transcript_messages("\n\nHuman: a\n\nb\n\nAssistant: c") == [U("a\n\nb"), A("c")]
    assert transcript_messages("Human: a") == [U("a")]
    assert transcript_messages("preamble\n\nHuman: a") is None


# ---------------------------------------------------------------- cot, corpus, prompt


def test_gsm8k_question_answer_csv(tmp_path):
    path = tmp_path / "cot.csv"
    pd.DataFrame({"question": ["Sam has 2 pens and gets 3 more. How many?"],
                  "answer": ["Sam starts with 2.\n2 + 3 = 5.\n#### 5"]}).to_csv(path, index=False)
    table = read_source(path, "cot")
    assert table.layout == "question/answer with '####' final answer"
    assert canonical(table) == [{"question": "Sam has 2 pens and gets 3 more. How many?",
                                 "rationale": "Sam starts with 2.\n2 + 3 = 5.", "answer": "5"}]


def test_question_rationale_answer_parquet(tmp_path):
    path = tmp_path / "cot.parquet"
    pd.DataFrame({"question": ["q"], "rationale": ["r"], "answer": ["7"]}).to_parquet(path, index=False)
    assert canonical(read_source(path, "cot")) == [{"question": "q", "rationale": "r", "answer": "7"}]


def test_text_corpus_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 7}\n')
    table = read_source(path, "corpus")
    assert canonical(table) == [{"text": "first doc"}, {"text": "second doc"}]
    assert [r["_row"] for r in table.rows] == [1, 3]


def test_prompt_parquet_with_optional_answer(tmp_path):
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": ["a?", "b?", "c?"], "answer": ["1", None, " "]}).to_parquet(path, index=False)
    assert canonical(read_source(path, "prompt")) == [
        {"prompt": "a?", "answer": "1"}, {"prompt": "b?", "answer": None}, {"prompt": "c?", "answer": None}]


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert canonical(read_source(path, "corpus")) == [{"text": "a"}, {"text": "b"}]


def test_sample_data_reads_clean(tmp_path, monkeypatch):
    """The embedded default's files (a small draw of stages.sample) each read in their expected layout."""
    from posttrain.core.config import TrackingConfig
    from stages.sample import SampleConfig, run

    monkeypatch.chdir(tmp_path)
    tracking = TrackingConfig(uri="", experiment="lifecycle", log_models=False)
    run(SampleConfig(seed=0, tracking=tracking, out_dir="raw", n_corpus_docs=5, n_instruction=20, n_refusal=5,
                     n_cot=5, n_preference=10, n_prompts=5, n_eval=5))
    layouts = {(p, k): read_source(Path("raw") / p, k).layout for p, k in [
        ("corpus.jsonl", "corpus"), ("instructions_alpaca.json", "instruction"),
        ("instructions_sharegpt.jsonl", "instruction"), ("refusals.jsonl", "refusal"), ("cot.csv", "cot"),
        ("preferences.jsonl", "preference"), ("prompts.parquet", "prompt"),
        ("heldout_instructions.jsonl", "instruction"), ("heldout_refusals.jsonl", "refusal"),
        ("heldout_cot.csv", "cot"), ("heldout_preferences.jsonl", "preference")]}
    assert list(layouts.values()) == ["text", "alpaca", "sharegpt", "messages",
                                      "question/answer with '####' final answer",
                                      "chosen/rejected with a shared prompt", "prompt",
                                      "messages", "prompt/response", "question/answer with '####' final answer",
                                      "prompt/chosen/rejected"]


# ---------------------------------------------------------------- gzip and column mapping


def test_gzipped_hh_preference_jsonl(tmp_path):
    """Anthropic HH as published: .jsonl.gz of chosen/rejected whole transcripts."""
    path = tmp_path / "hh-rlhf-train.jsonl.gz"
    shared = "\n\nHuman: What is 2 plus 2?"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": shared + "\n\nAssistant: 4", "rejected": shared + "\n\nAssistant: 5"}) + "\n")
    table = read_source(path, "preference")
    assert table.layout == "chosen/rejected with a shared prompt"
    assert canonical(table) == [{"prompt": [U("What is 2 plus 2?")], "chosen": "4", "rejected": "5"}]


@pytest.mark.parametrize("name", ["cot.json.gz", "cot.csv.gz", "cot.ndjson.gz"])
def test_gzipped_json_and_csv_are_read_by_the_suffix_under_gz(tmp_path, name):
    path = tmp_path / name
    rows = [{"question": "q", "rationale": "r", "answer": "7"}]
    if name.endswith(".csv.gz"):
        pd.DataFrame(rows).to_csv(path, index=False)  # pandas gzips by the suffix
    else:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(json.dumps(rows) if name.endswith(".json.gz") else json.dumps(rows[0]) + "\n")
    assert canonical(read_source(path, "cot")) == rows


def test_gzipped_parquet_and_damaged_gzip_are_refused(tmp_path):
    parquet = tmp_path / "cot.parquet.gz"
    parquet.write_bytes(gzip.compress(b"PAR1"))
    assert error(parquet, "cot").startswith(f"{parquet}: unknown file type '.parquet.gz' (read: .jsonl, ")
    damaged = tmp_path / "cot.jsonl.gz"
    damaged.write_bytes(b'{"question": "not gzip"}\n')
    assert error(damaged, "cot").startswith(f"{damaged}: unreadable gzip file (")


def test_columns_map_a_gsm8k_style_file_to_cot(tmp_path):
    path = jsonl(tmp_path / "math.jsonl", [
        {"problem": "Sam has 40 pens and gets 2 more. How many?", "solution": "40 + 2 = 42.\n#### 42", "id": 1},
        {"problem": "Ann has 1 pen. How many?", "solution": "She has one.", "id": 2},
    ])
    columns = {"problem": "question", "solution": "answer"}
    assert "unrecognised layout for kind 'cot'" in error(path, "cot")  # unmapped, no cot layout fits
    with pytest.raises(DataError) as e:
        read_source(path, "cot", columns)
    assert str(e.value) == (f"{path} line 2, column 'answer' (from 'solution'): check 'final_answer_marker' failed "
                            "(no '#### <final answer>' in value 'She has one.')")
    table = read_source(path, "cot", columns, on_bad_rows="drop", max_bad_share=0.5)
    assert table.layout == "question/answer with '####' final answer"
    assert canonical(table) == [{"question": "Sam has 40 pens and gets 2 more. How many?",
                                 "rationale": "40 + 2 = 42.", "answer": "42"}]
    assert table.rejects[0].raw == {"problem": "Ann has 1 pen. How many?", "solution": "She has one.", "id": 2}


def test_columns_naming_a_missing_column_or_clashing_stop_the_read(tmp_path):
    path = jsonl(tmp_path / "math.jsonl", [{"problem": "q", "answer": "1 + 1 = 2\n#### 2"}])
    with pytest.raises(DataError) as e:
        read_source(path, "cot", {"query": "question"})
    assert str(e.value) == (f"{path}, column 'query': not in the file, so it cannot be renamed to 'question' "
                            "(columns found: ['problem', 'answer'])")
    with pytest.raises(DataError) as e:
        read_source(path, "cot", {"problem": "answer"})
    assert str(e.value) == f"{path}, column 'answer': two columns would be named 'answer': ['problem', 'answer']"


# ---------------------------------------------------------------- on_bad_rows: drop


def test_drop_leaves_bad_rows_out_and_keeps_where_and_why(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(8))
                    + '{"text": ""}\n{"text": 3\n\n{"text": "last"}\n')
    table = read_source(path, "corpus", on_bad_rows="drop", max_bad_share=0.2)
    assert [r["_row"] for r in table.rows] == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert table.total == 11
    assert [r.to_json() for r in table.rejects] == [
        {"file": str(path), "row": 9, "unit": "line", "raw": {"text": ""},
         "problems": [{"column": "text", "check": "non_empty",
                       "error": f"{path} line 9, column 'text': check 'non_empty' failed (value '')"}]},
        {"file": str(path), "row": 10, "unit": "line", "raw": '{"text": 3',
         "problems": [{"column": None, "check": "json",
                       "error": f"{path} line 10: malformed JSON (Expecting ',' delimiter at column 11)"}]},
    ]
    assert error(path, "corpus") == f"{path} line 10: malformed JSON (Expecting ',' delimiter at column 11)"


def test_drop_stops_when_a_source_has_more_bad_rows_than_max_bad_share(tmp_path):
    path = tmp_path / "cot.csv"
    answers = ["6"] * 8 + ["", ""]
    pd.DataFrame({"question": [f"q{i}" for i in range(10)], "rationale": ["r"] * 10, "answer": answers}).to_csv(
        path, index=False)
    assert len(read_source(path, "cot", on_bad_rows="drop", max_bad_share=0.2).rows) == 8  # 20 %: at the limit
    with pytest.raises(DataError) as e:
        read_source(path, "cot", on_bad_rows="drop", max_bad_share=0.1)
    assert str(e.value).splitlines() == [
        "3 data problems:",
        (f"  {path}: 2 of 10 rows are bad (20.0%), more than max_bad_share 0.1 (10.0%) allows; "
         "fix the data or raise the limit"),
        f"  {path} row 9, column 'answer': check 'non_empty' failed (value '')",
        f"  {path} row 10, column 'answer': check 'non_empty' failed (value '')",
    ]


# ---------------------------------------------------------------- problems


def test_missing_file(tmp_path):
    assert error(tmp_path / "nope.jsonl", "corpus") == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 1,, }\n[1]\n')
    assert error(path, "corpus") == (
        f"2 data problems:\n  {path} line 2: malformed JSON (Expecting property name enclosed in double quotes "
        f"at column 12)\n"
        f"  {path} line 3: expected a JSON object, got list")


def test_unrecognised_layout_names_the_columns_found(tmp_path):
    path = tmp_path / "cot.csv"
    pd.DataFrame({"question": ["q"], "solution": ["s"]}).to_csv(path, index=False)
    message = error(path, "cot")
    assert message.startswith(f"{path}: unrecognised layout for kind 'cot': columns found ['question', 'solution']")
    assert "question/answer with '####' final answer (question, answer)" in message


def test_missing_value_in_a_row(tmp_path):
    path = jsonl(tmp_path / "cot.jsonl", [{"question": "q", "rationale": "r", "answer": "1"},
                                          {"question": "q2", "rationale": "r"}])
    assert error(path, "cot") == f"{path} line 2, column 'answer': check 'not_nullable' failed (missing value)"


def test_wrong_type(tmp_path):
    path = jsonl(tmp_path / "corpus.jsonl", [{"text": "fine"}, {"text": 3}])
    assert error(path, "corpus") == f"{path} line 2, column 'text': check 'dtype str' failed (value 3)"


def test_empty_text(tmp_path):
    path = jsonl(tmp_path / "corpus.jsonl", [{"text": "fine"}, {"text": "  \n"}])
    assert error(path, "corpus") == f"{path} line 2, column 'text': check 'non_empty' failed (value '  \\n')"


def test_empty_cell_in_csv_row_17(tmp_path):
    path = tmp_path / "cot.csv"
    answers = ["6"] * 16 + [""]
    pd.DataFrame({"question": ["q"] * 17, "rationale": ["r"] * 17, "answer": answers}).to_csv(path, index=False)
    assert error(path, "cot") == f"{path} row 17, column 'answer': check 'non_empty' failed (value '')"


def test_empty_alpaca_instruction_names_its_cell(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": " ", "input": "red", "output": "x"}]))
    assert error(path, "instruction") == f"{path} row 1, column 'instruction': check 'non_empty' failed (value ' ')"


def test_unknown_role(tmp_path):
    path = jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}])
    message = error(path, "instruction")
    assert (f"{path} line 1, column 'messages' (from 'conversations'): check 'known_roles' failed "
            f"(unknown role(s) 'bot'; allowed: system, user, assistant)") in message


def test_chosen_equals_rejected(tmp_path):
    path = jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same "}])
    assert error(path, "preference") == (
        f"{path} line 1, column 'chosen, rejected': check 'chosen_ne_rejected' failed (value 'same')")


def test_whole_transcripts_with_no_shared_prompt(tmp_path):
    path = jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"chosen": "no turns at all", "rejected": "none here either"},
    ])
    message = error(path, "preference")
    assert message.splitlines()[1:] == [
        f"  {path} line 1, column 'chosen, rejected': check 'shared_prompt' failed (the two transcripts "
        "differ before their last '\\n\\nAssistant:', so they share no prompt)",
        f"  {path} line 2, column 'chosen, rejected': check 'shared_prompt' failed (the two transcripts "
        "differ before their last '\\n\\nAssistant:', so they share no prompt)",
    ]


def test_message_pairs_with_no_shared_prompt(tmp_path):
    path = jsonl(tmp_path / "pref.jsonl", [{"chosen": [U("a"), A("x")], "rejected": [U("b"), A("y")]}])
    assert error(path, "preference") == (
        f"{path} line 1, column 'chosen, rejected': check 'shared_prompt' failed "
        "(the two message lists share no leading messages)")


def test_cot_answer_without_final_answer_marker(tmp_path):
    path = jsonl(tmp_path / "cot.jsonl", [{"question": "q", "answer": "it is 4"}])
    assert error(path, "cot") == (
        f"{path} line 1, column 'answer': check 'final_answer_marker' failed (no '#### <final answer>' in value 'it is 4')")


def test_multi_turn_refusal_is_rejected(tmp_path):
    path = jsonl(tmp_path / "ref.jsonl", [{"messages": [U("a"), A("b"), U("c"), A("no")]}])
    assert "check 'single_turn' failed" in error(path, "refusal")


def test_report_is_capped_and_read_sources_collects_every_file(tmp_path):
    bad = jsonl(tmp_path / "corpus.jsonl", [{"text": ""}] * 25)
    with pytest.raises(DataError) as e:
        read_sources([(bad, "corpus"), (tmp_path / "missing.csv", "cot")])
    assert len(e.value.problems) == 26
    lines = str(e.value).splitlines()
    assert lines[0] == "26 data problems (first 20 shown):"
    assert len(lines) == 21
    assert lines[1] == f"  {bad} line 1, column 'text': check 'non_empty' failed (value '')"


def test_sample_preference_pairs_never_repeat_the_chosen_reply():
    """At scale the generator once rotated '6 6 6' into itself, and prepare (rightly) refused the pair."""
    import random

    from stages.sample import preference

    rng = random.Random(0)
    pairs = [preference(rng) for _ in range(20_000)]
    assert all(chosen != rejected for _, chosen, rejected in pairs)


def test_sample_corpus_states_arithmetic_facts_without_giving_the_answer_first():
    """With "7 plus 4 is 11. 7 + 4 = 11." cpt learned to copy 11, not to add, and sft never learned the word
    problems. Each fact must stand alone (no "a plus b is c" before it) and be right."""
    import random
    import re

    from stages.sample import corpus_doc

    rng = random.Random(0)
    facts = 0
    for _ in range(300):
        doc = corpus_doc(rng)
        assert " plus " not in doc and " minus " not in doc
        for a, op, b, result in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", doc):
            facts += 1
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert facts > 200
