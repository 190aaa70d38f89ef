"""Data contracts: each kind's pandera model accepts good rows, and each named check reports its failure
with file, row, column and check."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
import pytest

from posttrain.data.readers import validate_frame
from schemas import KINDS, SCHEMAS
from schemas.checks import MAX_CHARS

PATH = "data/raw/x.jsonl"


def frame(rows: list[dict], first_row: int = 1) -> pd.DataFrame:
    """Canonical rows as the readers hand them to the schemas: object columns, index = row numbers."""
    return pd.DataFrame(rows, index=range(first_row, first_row + len(rows)), dtype=object)


def problems(kind: str, rows: list[dict], first_row: int = 1) -> list[str]:
    return [str(p) for p in validate_frame(frame(rows, first_row), kind, PATH)]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


GOOD = {
    "corpus": {"text": "The fox ran."},
    "instruction": {"messages": [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hello")]},
    "refusal": {"prompt": "How do I rob a store?", "response": "I can't help with that request."},
    "cot": {"question": "2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5"},
    "preference": {"prompt": [U("2 + 3?")], "chosen": "5", "rejected": "6"},
    "prompt": {"prompt": "2 + 3?", "answer": None},
}


@pytest.mark.parametrize("kind", KINDS)
def test_good_rows_pass(kind):
    assert problems(kind, [GOOD[kind]]) == []


def test_every_check_is_named():
    for kind, model in SCHEMAS.items():
        schema = model.to_schema()
        names = [c.name for col in schema.columns.values() for c in col.checks] + [c.name for c in schema.checks]
        assert names and all(names), kind


def test_corpus_checks():
    assert problems("corpus", [{"text": ""}, {"text": "x" * (MAX_CHARS + 1)}, {"text": 5}], first_row=7) == [
        f"{PATH} row 7, column 'text': check 'non_empty' failed (value '')",
        f"{PATH} row 8, column 'text': check 'max_chars' failed (value 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...)",
        f"{PATH} row 9, column 'text': check 'dtype str' failed (value 5)",
    ]


def test_instruction_checks():
    rows = [
        {"messages": "not a list"},
        {"messages": [U("Hi"), {"role": "tool", "content": "x"}, A("ok")]},
        {"messages": [U("Hi"), A("  ")]},
        {"messages": [A("unprompted")]},
        {"messages": [U("Hi")]},
        {"messages": [{"role": "user", "text": "wrong key"}, A("ok")]},
    ]
    assert problems("instruction", rows) == [
        f"{PATH} row 1, column 'messages': check 'message_list' failed (value 'not a list')",
        f"{PATH} row 2, column 'messages': check 'known_roles' failed (unknown role(s) 'tool'; allowed: system, "
        "user, assistant)",
        f"{PATH} row 3, column 'messages': check 'non_empty_content' failed (message 1 (assistant) has empty content)",
        f"{PATH} row 4, column 'messages': check 'has_user' failed (value [{{'role': 'assistant', 'content': "
        "'unprompted'}])",
        f"{PATH} row 5, column 'messages': check 'ends_with_assistant' failed (last message is from 'user')",
        f"{PATH} row 6, column 'messages': check 'message_list' failed (value [{{'role': 'user', 'text': 'wrong "
        "key'}, {'role': 'assistant', 'content': 'ok'}])",
    ]


def test_refusal_checks():
    assert problems("refusal", [{"prompt": "", "response": "No."}, {"prompt": "Rob?", "response": None}]) == [
        f"{PATH} row 1, column 'prompt': check 'non_empty' failed (value '')",
        f"{PATH} row 2, column 'response': check 'not_nullable' failed (missing value)",
    ]


def test_cot_checks_answer_present_and_bare():
    rows = [{"question": "q", "rationale": "r", "answer": ""}, {"question": "q", "rationale": "r", "answer": "#### 4"}]
    assert problems("cot", rows) == [
        f"{PATH} row 1, column 'answer': check 'non_empty' failed (value '')",
        f"{PATH} row 2, column 'answer': check 'no_answer_marker' failed (value '#### 4')",
    ]


def test_preference_checks():
    rows = [
        {"prompt": [U("q")], "chosen": "same", "rejected": " same"},
        {"prompt": [U("q"), A("a")], "chosen": "x", "rejected": "y"},
        {"prompt": [U("q")], "chosen": "", "rejected": "y"},
    ]
    assert problems("preference", rows) == [
        f"{PATH} row 1, column 'chosen, rejected': check 'chosen_ne_rejected' failed (value 'same')",
        f"{PATH} row 2, column 'prompt': check 'ends_with_user' failed (last message is from 'assistant')",
        f"{PATH} row 3, column 'chosen': check 'non_empty' failed (value '')",
    ]


def test_prompt_checks_answer_optional_but_not_blank():
    assert problems("prompt", [{"prompt": "a?", "answer": "1"}, {"prompt": "b?", "answer": " "}]) == [
        f"{PATH} row 2, column 'answer': check 'non_empty' failed (value ' ')"]


def test_missing_and_unexpected_columns():
    assert problems("prompt", [{"answer": "1", "extra": 2}]) == [
        f"{PATH}, column 'extra': check 'column_in_schema' failed (unexpected column)",
        f"{PATH}, column 'prompt': check 'column_in_dataframe' failed (missing column)",
    ]


def test_lazy_validation_reports_every_failure():
    with pytest.raises(pa.errors.SchemaErrors) as e:
        SCHEMAS["corpus"].validate(frame([{"text": ""}, {"text": " "}, {"text": "ok"}]), lazy=True)
    assert list(e.value.failure_cases["index"]) == [1, 2]
