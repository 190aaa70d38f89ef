"""Readers: raw files in the formats people have -> validated canonical rows of one declared kind.

`read_source(path, kind)` reads JSONL, JSON (an array or {"data": [...]}), Parquet or CSV, detects
the layout from the columns, turns every record into the kind's canonical row, validates the rows
against the kind's pandera model (schemas/) and returns them with provenance (`_source`, `_row`).
Anything wrong raises `DataError`, which names file, row, column and the failed check, e.g.

    data/raw/cot.csv row 17, column 'answer': check 'non_empty' failed (value '')

Rows are numbered from 1: the record's position, or for JSONL its line ("line 5").

Canonical rows, by kind, and the layouts read into them (first match on the columns wins):
  corpus      {"text"}                                  text
  instruction {"messages": [{"role","content"}, ...]}   messages (OpenAI) | conversations (sharegpt:
                                                        from/value) | instruction/input/output
                                                        (alpaca, optional system) | prompt/response
                                                        | prompt/completion (strings or messages)
  refusal     {"prompt", "response"}                    any instruction layout, one user turn
  cot         {"question", "rationale", "answer"}       question/rationale/answer | question/answer
                                                        with a GSM8K final answer ("...\\n#### 42")
  preference  {"prompt": [messages], "chosen", "rejected"}  prompt/chosen/rejected (strings or
                                                        messages) | chosen/rejected message lists
                                                        or whole transcripts ("\\n\\nHuman: ...
                                                        \\n\\nAssistant: ...") sharing their prompt
  prompt      {"prompt", "answer" (str or None)}        prompt (+ answer)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from posttrain.config import StageError
from schemas import KINDS, ROW_CHECK_COLUMNS, SCHEMAS
from schemas.checks import explain, message_list

MAX_REPORTED = 20  # problems listed in one DataError message (all are kept on `.problems`)
ANSWER_MARKER = "####"  # GSM8K: "rationale ...\n#### 42"
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # sharegpt `from` values
ASSISTANT = "\n\nAssistant:"
TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, located as precisely as it can be."""

    path: str
    message: str  # "check 'non_empty' failed (value '')", or a plain sentence for file-level problems
    row: int | None = None
    column: str | None = None
    origin: str | None = None  # the source column(s) a canonical column was built from
    unit: str = "row"  # "line" for JSONL

    def __str__(self) -> str:
        where = self.path
        if self.row is not None:
            where += f" {self.unit} {self.row}"
        if self.column:
            where += f", column '{self.column}'" + (f" (from {self.origin})" if self.origin else "")
        return f"{where}: {self.message}"


class DataError(StageError):
    """Bad input data; the message lists the problems (the first MAX_REPORTED of them)."""

    label = "data error"

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: list[Problem], limit: int = MAX_REPORTED) -> str:
    if len(problems) == 1:
        return str(problems[0])
    shown = f" (first {limit} shown)" if len(problems) > limit else ""
    return "\n".join([f"{len(problems)} data problems{shown}:", *(f"  {p}" for p in problems[:limit])])


def failed(check: str, value: Any = None, why: str | None = None) -> str:
    return f"check '{check}' failed ({why or 'value ' + short(value)})"


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _RowError(Exception):
    """Raised by a layout's converter: this record cannot become a canonical row."""

    def __init__(self, column: str, check: str, value: Any = None, why: str | None = None):
        super().__init__(check)
        self.column, self.check, self.value, self.why = column, check, value, why


# ---------------------------------------------------------------- files -> records


def read_records(path: str | Path) -> tuple[list[tuple[int, dict]], str]:
    """[(row number, record)] and the row unit ("line" for JSONL, else "row")."""
    p, name = Path(path), str(path)
    if not p.is_file():
        raise DataError([Problem(name, "no such file")])
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
               ".parquet": _read_parquet, ".csv": _read_csv}
    if suffix not in readers:
        raise DataError([Problem(name, f"unknown file type {suffix!r} (read: {', '.join(readers)})")])
    records, unit = readers[suffix](p, name)
    if not records:
        raise DataError([Problem(name, "no rows")])
    return records, unit


def _read_jsonl(p: Path, name: str) -> tuple[list[tuple[int, dict]], str]:
    records, problems = [], []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(name, f"malformed JSON ({e.msg} at column {e.pos + 1})", lineno, unit="line"))
                continue
            if not isinstance(rec, dict):
                problems.append(Problem(name, f"expected a JSON object, got {type(rec).__name__}", lineno, unit="line"))
                continue
            records.append((lineno, rec))
    if problems:
        raise DataError(problems)
    return records, "line"


def _read_json(p: Path, name: str) -> tuple[list[tuple[int, dict]], str]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file
            return _read_jsonl(p, name)
        raise DataError([Problem(name, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})")])
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError([Problem(name, 'expected a JSON array of objects or {"data": [...]}')])
    bad = [Problem(name, f"expected a JSON object, got {type(r).__name__}", i)
           for i, r in enumerate(data, 1) if not isinstance(r, dict)]
    if bad:
        raise DataError(bad)
    return list(enumerate(data, 1)), "row"


def _read_parquet(p: Path, name: str) -> tuple[list[tuple[int, dict]], str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()  # python values: nested lists of dicts stay lists of dicts
    except (pa.ArrowException, OSError) as e:
        raise DataError([Problem(name, f"unreadable Parquet ({e})")])
    return list(enumerate(rows, 1)), "row"


def _read_csv(p: Path, name: str) -> tuple[list[tuple[int, dict]], str]:
    import pandas as pd

    try:  # every cell a string; an empty cell stays '' so the schema can say so
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return [], "row"
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError([Problem(name, f"unreadable CSV ({e})")])
    return list(enumerate(df.to_dict("records"), 1)), "row"


def columns_of(records: list[tuple[int, dict]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, rec in records:
        seen.update(dict.fromkeys(rec))
    return list(seen)


# ---------------------------------------------------------------- records -> canonical rows


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _text(rec: dict, col: str) -> str:
    """A required, non-empty string cell (for layouts that merge cells, so the error names the cell)."""
    x = rec.get(col)
    if _missing(x):
        raise _RowError(col, "not_nullable", why="missing value")
    if not isinstance(x, str):
        raise _RowError(col, "dtype str", x)
    if not x.strip():
        raise _RowError(col, "non_empty", x)
    return x


def _optional_text(rec: dict, col: str) -> str | None:
    x = rec.get(col)
    if _missing(x) or (isinstance(x, str) and not x.strip()):
        return None
    if not isinstance(x, str):
        raise _RowError(col, "dtype str", x)
    return x


def _messages(x: Any) -> Any:
    """OpenAI {role, content} or sharegpt {from, value} items -> [{"role", "content"}].

    Anything that is not a list of objects is returned as is: the schema's `message_list` check
    reports it. Unknown roles are kept as written, for `known_roles` to report.
    """
    if not isinstance(x, list):
        return x
    out = []
    for m in x:
        if not isinstance(m, dict):
            out.append(m)
            continue
        role = m.get("role", m.get("from"))
        out.append({"role": ROLE_ALIASES.get(role, role), "content": m.get("content", m.get("value"))})
    return out


def _user(text: Any) -> list:
    """A prompt cell: a string becomes one user message; a message list is normalised."""
    return _messages(text) if isinstance(text, list) else [{"role": "user", "content": text}]


def _system(rec: dict) -> list[dict]:
    system = _optional_text(rec, "system")
    return [{"role": "system", "content": system}] if system else []


# chat layouts -> {"messages"}


def _openai_chat(rec: dict) -> list:
    return _messages(rec.get("messages"))


def _sharegpt_chat(rec: dict) -> list:
    return _messages(rec.get("conversations"))


def _alpaca_chat(rec: dict) -> list:
    instruction, output = _text(rec, "instruction"), _text(rec, "output")
    extra = _optional_text(rec, "input")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [*_system(rec), {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_reply_chat(reply_col: str) -> Callable[[dict], list]:
    def convert(rec: dict) -> list:
        reply = rec.get(reply_col)
        reply = _messages(reply) if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
        return [*_system(rec), *_user(rec.get("prompt")), *reply]
    return convert


def _as_instruction(chat: Callable[[dict], list]) -> Callable[[dict], dict]:
    return lambda rec: {"messages": chat(rec)}


def _refusal(chat: Callable[[dict], list], source: str) -> Callable[[dict], dict]:
    """A chat layout read as a refusal: exactly one user turn, then the assistant's reply."""
    def convert(rec: dict) -> dict:
        msgs = chat(rec)
        if not message_list(msgs):
            raise _RowError(source, "message_list", msgs)
        turns = [m for m in msgs if m["role"] != "system"]
        roles = [m["role"] for m in turns]
        if roles != ["user", "assistant"]:
            raise _RowError(source, "single_turn", why=f"a refusal is one user turn then the assistant's "
                                                       f"reply; roles are {roles}")
        return {"prompt": turns[0]["content"], "response": turns[1]["content"]}
    return convert


# cot


def _cot_direct(rec: dict) -> dict:
    return {"question": rec.get("question"), "rationale": rec.get("rationale"), "answer": rec.get("answer")}


def _cot_marked(rec: dict) -> dict:
    answer = rec.get("answer")
    if _missing(answer):
        raise _RowError("answer", "not_nullable", why="missing value")
    if not isinstance(answer, str):
        raise _RowError("answer", "dtype str", answer)
    if ANSWER_MARKER not in answer:
        raise _RowError("answer", "final_answer_marker", answer,
                        why=f"no '{ANSWER_MARKER} <final answer>' in value {short(answer)}")
    rationale, _, final = answer.rpartition(ANSWER_MARKER)
    return {"question": rec.get("question"), "rationale": rationale.strip(), "answer": final.strip()}


# preference


def _split_transcript(text: str) -> tuple[str, str] | None:
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> (everything before the last Assistant turn, its reply)."""
    i = text.rfind(ASSISTANT)
    return None if i < 0 else (text[:i], text[i + len(ASSISTANT):].strip())


def transcript_messages(text: str) -> list[dict] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> messages; None if it is not such a transcript."""
    parts = TRANSCRIPT_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": "user" if tag == "Human" else "assistant", "content": body.strip()}
            for tag, body in zip(parts[1::2], parts[2::2])]


def _transcript_pair(chosen: str, rejected: str) -> dict:
    c, r = _split_transcript(chosen), _split_transcript(rejected)
    if c is None or r is None or c[0] != r[0]:
        raise _RowError("chosen, rejected", "shared_prompt", why=(
            "the two transcripts differ before their last '\\n\\nAssistant:', so they share no prompt"))
    prompt = transcript_messages(c[0])
    if not prompt or not any(m["role"] == "user" for m in prompt):
        raise _RowError("chosen, rejected", "shared_prompt", why=(
            f"the shared prefix {short(c[0])} holds no '\\n\\nHuman:' turn"))
    return {"prompt": prompt, "chosen": c[1], "rejected": r[1]}


def _final_reply(msgs: Any, prompt: list, col: str) -> str:
    """The assistant reply that follows `prompt` in a message-list `chosen` / `rejected` cell."""
    msgs = _messages(msgs)
    if not message_list(msgs):
        raise _RowError(col, "message_list", msgs)
    if msgs[: len(prompt)] == prompt:
        msgs = msgs[len(prompt):]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _RowError(col, "final_assistant_turn", why=(
            f"expected one assistant message after the prompt, got roles {[m['role'] for m in msgs]}"))
    return msgs[0]["content"]


def _message_pair(chosen: list, rejected: list) -> dict:
    c, r = _messages(chosen), _messages(rejected)
    for col, msgs in (("chosen", c), ("rejected", r)):
        if not message_list(msgs):
            raise _RowError(col, "message_list", msgs)
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if c == r:  # identical: the final turn is the "pair", which the schema reports as chosen == rejected
        k = len(c) - 1
    if k == 0:
        raise _RowError("chosen, rejected", "shared_prompt", why="the two message lists share no leading messages")
    prompt = c[:k]
    return {"prompt": prompt, "chosen": _final_reply(c[k:], [], "chosen"),
            "rejected": _final_reply(r[k:], [], "rejected")}


def _preference(rec: dict) -> dict:
    prompt, chosen, rejected = rec.get("prompt"), rec.get("chosen"), rec.get("rejected")
    for col, x in (("chosen", chosen), ("rejected", rejected)):
        if _missing(x):
            raise _RowError(col, "not_nullable", why="missing value")
        if not isinstance(x, (str, list)):
            raise _RowError(col, "dtype str or message list", x)
    if not _missing(prompt):
        msgs = _user(prompt)
        if not message_list(msgs):
            return {"prompt": msgs, "chosen": chosen, "rejected": rejected}  # the schema reports it
        def reply(x: str | list, col: str) -> str:
            return x if isinstance(x, str) else _final_reply(x, msgs, col)
        return {"prompt": msgs, "chosen": reply(chosen, "chosen"), "rejected": reply(rejected, "rejected")}
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _transcript_pair(chosen, rejected)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _message_pair(chosen, rejected)
    raise _RowError("chosen, rejected", "same_type", why="one is a string, the other a message list")


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    name: str
    needs: tuple[str, ...]  # columns that must be present
    convert: Callable[[dict], dict]  # record -> canonical row (raises _RowError)
    origin: dict[str, str] = field(default_factory=dict)  # canonical column -> the source columns it reads


LAYOUTS: dict[str, list[Layout]] = {
    "corpus": [Layout("text", ("text",), lambda r: {"text": r.get("text")})],
    "instruction": [
        Layout("messages", ("messages",), _as_instruction(_openai_chat)),
        Layout("sharegpt", ("conversations",), _as_instruction(_sharegpt_chat), {"messages": "'conversations'"}),
        Layout("alpaca", ("instruction", "output"), _as_instruction(_alpaca_chat),
               {"messages": "'instruction', 'input', 'output'"}),
        Layout("prompt/response", ("prompt", "response"), _as_instruction(_prompt_reply_chat("response")),
               {"messages": "'prompt', 'response'"}),
        Layout("prompt/completion", ("prompt", "completion"), _as_instruction(_prompt_reply_chat("completion")),
               {"messages": "'prompt', 'completion'"}),
    ],
    "refusal": [
        Layout("messages", ("messages",), _refusal(_openai_chat, "messages"),
               {"prompt": "'messages'", "response": "'messages'"}),
        Layout("sharegpt", ("conversations",), _refusal(_sharegpt_chat, "conversations"),
               {"prompt": "'conversations'", "response": "'conversations'"}),
        Layout("alpaca", ("instruction", "output"), _refusal(_alpaca_chat, "instruction"),
               {"prompt": "'instruction', 'input'", "response": "'output'"}),
        Layout("prompt/response", ("prompt", "response"), _refusal(_prompt_reply_chat("response"), "prompt")),
        Layout("prompt/completion", ("prompt", "completion"), _refusal(_prompt_reply_chat("completion"), "prompt"),
               {"response": "'completion'"}),
    ],
    "cot": [
        Layout("question/rationale/answer", ("question", "rationale", "answer"), _cot_direct),
        Layout("question/answer with '####' final answer", ("question", "answer"), _cot_marked,
               {"rationale": "'answer' before '####'", "answer": "'answer' after '####'"}),
    ],
    "preference": [
        Layout("prompt/chosen/rejected", ("prompt", "chosen", "rejected"), _preference),
        Layout("chosen/rejected with a shared prompt", ("chosen", "rejected"), _preference,
               {"prompt": "the shared start of 'chosen' and 'rejected'", "chosen": "'chosen' after the prompt",
                "rejected": "'rejected' after the prompt"}),
    ],
    "prompt": [Layout("prompt", ("prompt",),
                      lambda r: {"prompt": r.get("prompt"), "answer": _optional_text(r, "answer")})],
}


def detect_layout(kind: str, columns: list[str], path: str) -> Layout:
    for layout in LAYOUTS[kind]:
        if set(layout.needs) <= set(columns):
            return layout
    expected = "; ".join(f"{lay.name} ({', '.join(lay.needs)})" for lay in LAYOUTS[kind])
    raise DataError([Problem(path, f"unrecognised layout for kind '{kind}': columns found {columns}; "
                                   f"expected one of: {expected}")])


# ---------------------------------------------------------------- validation


def validate_frame(df, kind: str, path: str, unit: str = "row", origin: dict | None = None) -> list[Problem]:
    """Validate a canonical DataFrame (index = row numbers) against the kind's schema, lazily."""
    import pandera.pandas as pa

    try:
        SCHEMAS[kind].validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        return _problems(e.failure_cases, path, unit, origin or {})
    return []


def _problems(cases, path: str, unit: str, origin: dict[str, str]) -> list[Problem]:
    found: dict[tuple, Problem] = {}
    for case in cases.to_dict("records"):
        check, column, value, index = str(case["check"]), case["column"], case["failure_case"], case["index"]
        row = None if _missing(index) else int(index)
        if check in ("column_in_dataframe", "column_in_schema"):
            column, message = value, failed(check, why="missing column" if check == "column_in_dataframe"
                                            else "unexpected column")
        elif check.startswith("dtype("):
            check = "dtype str" if "str" in check else "dtype"
            message = failed(check, value)
        else:
            if check in ROW_CHECK_COLUMNS:  # reported once per row, with the first compared column's value
                if column not in ROW_CHECK_COLUMNS[check]:
                    continue
                column = ", ".join(ROW_CHECK_COLUMNS[check])
            why = "missing value" if check == "not_nullable" else explain(check, value)
            message = failed(check, value, why)
        key = (row if row is not None else -1, str(column), check)
        found.setdefault(key, Problem(path, message, row, column, origin.get(column), unit))
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------- sources


@dataclass
class Table:
    """One source file read as one kind: validated canonical rows, each with `_source` and `_row`."""

    path: str
    kind: str
    layout: str
    rows: list[dict]


def read_source(path: str | Path, kind: str) -> Table:
    import pandas as pd

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    path = str(path)
    records, unit = read_records(path)
    layout = detect_layout(kind, columns_of(records), path)
    rows, problems = [], []
    for n, rec in records:
        try:
            row = layout.convert(rec)
        except _RowError as e:
            problems.append(Problem(path, failed(e.check, e.value, e.why), n, e.column, unit=unit))
            continue
        rows.append({**row, "_source": path, "_row": n})
    columns = list(SCHEMAS[kind].to_schema().columns)
    if rows:
        df = pd.DataFrame([[r[c] for c in columns] for r in rows], columns=columns,
                          index=[r["_row"] for r in rows], dtype=object)
        problems += validate_frame(df, kind, path, unit, layout.origin)
    if problems:
        raise DataError(sorted(problems, key=lambda p: (p.row or 0, p.column or "")))
    return Table(path, kind, layout.name, rows)


def read_sources(sources: Iterable[tuple[str | Path, str]]) -> list[Table]:
    """Read and validate every (path, kind); one DataError with the problems of all of them."""
    tables, problems = [], []
    for path, kind in sources:
        try:
            tables.append(read_source(path, kind))
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    return tables
