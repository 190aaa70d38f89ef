"""Readers: raw files in the formats people have -> validated canonical rows of one declared kind.

`read_source(path, kind)` reads JSONL, JSON (an array or {"data": [...]}), Parquet or CSV, each but
Parquet also gzipped (`.jsonl.gz`: the type is the suffix under `.gz`), renames columns where asked
(`columns={their_name: our_name}`), detects the layout from the columns, turns every record into the
kind's canonical row, validates the rows against the kind's pandera model (schemas/) and returns them
with provenance (`_source`, `_row`). Anything wrong raises `DataError`, which names file, row, column
and the failed check, e.g.

    data/raw/cot.csv row 17, column 'answer': check 'non_empty' failed (value '')

With `on_bad_rows="drop"` a bad row is left out instead and kept, with its problems and the row as read,
on `Table.rejects`; the read still stops when the source's share of bad rows exceeds `max_bad_share`.
Problems of the file as a whole (no such file, unknown type, a wrong `columns` mapping, unrecognised
layout) always stop it.

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

import codecs
import gzip
import io
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from posttrain.core.config import StageError
from schemas import KINDS, ROW_CHECK_COLUMNS, SCHEMAS
from schemas.checks import MAX_CHARS, char_limit, explain, message_list

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
    check: str | None = None  # the failed check's name, for the rejects file

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


Records = list[tuple[int, dict]]  # [(row number, record)]
Unreadable = list[tuple[Problem, Any]]  # rows that are no record (malformed JSON, not an object), with their raw text


def read_records(path: str | Path, encoding: str = "utf-8") -> tuple[Records, str, Unreadable]:
    """[(row number, record)], the row unit ("line" for JSONL, else "row") and the unreadable rows.

    Text formats are decoded with `encoding` (a source's `encoding:` in prepare.sources); UTF-8 may start with a
    byte-order mark, and CRLF or CR line ends read as LF."""
    p, name = Path(path), str(path)
    if p.is_dir():
        raise DataError([Problem(name, "is a folder, not a data file; name one file per source in prepare.sources")])
    if not p.is_file():
        raise DataError([Problem(name, "no such file")])
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
               ".parquet": _read_parquet, ".csv": _read_csv}
    gzipped = p.suffix.lower() == ".gz"
    suffix = Path(p.stem).suffix.lower() if gzipped else p.suffix.lower()  # "x.jsonl.gz" is read as JSONL
    if suffix not in readers or (gzipped and suffix == ".parquet"):  # Parquet compresses inside the file
        known = [*readers, *(f"{s}.gz" for s in readers if s != ".parquet")]
        shown = suffix + ".gz" if gzipped else suffix
        raise DataError([Problem(name, f"unknown file type {shown!r} (read: {', '.join(known)})")])
    if suffix == ".parquet":
        records, unit, unreadable = _read_parquet(p, name)
    else:
        records, unit, unreadable = readers[suffix](_read_text(p, name, encoding, gzipped), name)
    if not records and not unreadable:
        raise DataError([Problem(name, "no rows")])
    return records, unit, unreadable


def _read_text(p: Path, name: str, encoding: str, gzipped: bool) -> str:
    """The file's text: gunzipped where it is .gz, decoded, universal newlines (as `open` reads text)."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise DataError([Problem(name, f"unknown encoding {encoding!r}; set this source's `encoding:` in "
                                       f"prepare.sources to a Python codec name (utf-8, latin-1, cp1252, utf-16)")])
    raw = p.read_bytes()
    if gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # a damaged, truncated or not-really-gzip .gz
            raise DataError([Problem(name, f"unreadable gzip file ({e}); re-compress it or give the file unzipped")])
    try:
        text = raw.decode("utf-8-sig" if codec == "utf-8" else codec)  # a UTF-8 byte-order mark is no data
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError([Problem(name, f"not {encoding} text (byte {raw[e.start]:#04x} at byte column {column}); "
                                       f"set this source's `encoding:` in prepare.sources (e.g. encoding: latin-1) "
                                       f"or save the file as UTF-8", line, unit="line", check="encoding")])
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(text: str, name: str) -> tuple[Records, str, Unreadable]:
    records, unreadable = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            unreadable.append((Problem(name, f"malformed JSON ({e.msg} at column {e.pos + 1})", lineno,
                                       unit="line", check="json"), line.rstrip("\n")))
            continue
        if not isinstance(rec, dict):
            unreadable.append((Problem(name, f"expected a JSON object, got {type(rec).__name__}", lineno,
                                       unit="line", check="json_object"), rec))
            continue
        records.append((lineno, rec))
    return records, "line", unreadable


def _read_json(text: str, name: str) -> tuple[Records, str, Unreadable]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file
            return _read_jsonl(text, name)
        raise DataError([Problem(name, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})")])
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError([Problem(name, 'expected a JSON array of objects or {"data": [...]}')])
    records = [(i, r) for i, r in enumerate(data, 1) if isinstance(r, dict)]
    unreadable = [(Problem(name, f"expected a JSON object, got {type(r).__name__}", i, check="json_object"), r)
                  for i, r in enumerate(data, 1) if not isinstance(r, dict)]
    return records, "row", unreadable


def _read_parquet(p: Path, name: str) -> tuple[Records, str, Unreadable]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()  # python values: nested lists of dicts stay lists of dicts
    except (pa.ArrowException, OSError) as e:
        raise DataError([Problem(name, f"unreadable Parquet ({e})")])
    return list(enumerate(rows, 1)), "row", []


def _read_csv(text: str, name: str) -> tuple[Records, str, Unreadable]:
    import pandas as pd

    try:  # every cell a string; an empty cell stays '' so the schema can say so; quoted cells may span lines
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return [], "row", []
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError([Problem(name, f"unreadable CSV ({str(e).strip()}); check its quoting and column count")])
    return list(enumerate(df.to_dict("records"), 1)), "row", []


def columns_of(records: Records) -> list[str]:
    seen: dict[str, None] = {}
    for _, rec in records:
        seen.update(dict.fromkeys(rec))
    return list(seen)


def rename_columns(records: Records, columns: dict[str, str], path: str) -> Records:
    """Rename the file's columns to ours: `columns` is {their name: our name}; the others keep theirs.

    A name the file does not have, or two columns ending up with one name, stops the read: either
    would silently read the wrong data.
    """
    found = columns_of(records)
    problems = [Problem(path, f"not in the file, so it cannot be renamed to {ours!r} (columns found: {found})",
                        column=theirs, check="columns")
                for theirs, ours in columns.items() if theirs not in found]
    names = [columns.get(c, c) for c in found]
    problems += [Problem(path, f"two columns would be named {ours!r}: "
                               f"{[c for c in found if columns.get(c, c) == ours]}", column=ours, check="columns")
                 for ours in dict.fromkeys(names) if names.count(ours) > 1]
    if problems:
        raise DataError(problems)
    return [(n, {columns.get(k, k): v for k, v in rec.items()}) for n, rec in records]


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


def validate_frame(df, kind: str, path: str, unit: str = "row", origin: dict | None = None,
                   max_chars: int | None = None) -> list[Problem]:
    """Validate a canonical DataFrame (index = row numbers) against the kind's schema, lazily.

    `max_chars` (prepare.max_chars) bounds every string and message; when it is given, a too-long one is reported
    with its length and the limit (else the schemas' default limit applies and the value is shown)."""
    import pandera.pandas as pa

    with char_limit(max_chars) as limit:
        try:
            SCHEMAS[kind].validate(df, lazy=True)
        except pa.errors.SchemaErrors as e:
            return _problems(e.failure_cases, path, unit, origin or {}, limit if max_chars is not None else None)
    return []


def _too_long(value: Any, limit: int) -> str:
    longest = len(value) if isinstance(value, str) else max(len(m["content"]) for m in value)
    return (f"{longest} chars, more than the limit of {limit} (prepare.max_chars in params.yaml): shorten the row, "
            f"raise the limit, or set on_bad_rows: drop to leave such rows out")


def _problems(cases, path: str, unit: str, origin: dict[str, str], limit: int | None = None) -> list[Problem]:
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
            if limit is not None and check in ("max_chars", "messages_max_chars"):
                why = _too_long(value, limit)
            message = failed(check, value, why)
        key = (row if row is not None else -1, str(column), check)
        found.setdefault(key, Problem(path, message, row, column, origin.get(column), unit, check))
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------- sources


ON_BAD_ROWS = ("stop", "drop")


@dataclass
class Reject:
    """A bad row left out under on_bad_rows="drop": where it is, every check it failed, and the row as read."""

    path: str
    row: int
    unit: str
    problems: list[Problem]
    raw: Any  # the record with the file's own column names, or the text of a line that is not JSON

    def to_json(self) -> dict:
        return {"file": self.path, "row": self.row, "unit": self.unit,
                "problems": [{"column": p.column, "check": p.check, "error": str(p)} for p in self.problems],
                "raw": json.loads(json.dumps(self.raw, default=str))}  # Parquet dates, bytes: as text


@dataclass
class Table:
    """One source file read as one kind: validated canonical rows, each with `_source` and `_row`."""

    path: str
    kind: str
    layout: str
    rows: list[dict]
    rejects: list[Reject] = field(default_factory=list)  # bad rows left out (on_bad_rows="drop")
    total: int = 0  # rows in the file, kept and rejected


def _by_place(p: Problem) -> tuple:
    return (p.row or 0, p.column or "")


def read_source(path: str | Path, kind: str, columns: dict[str, str] | None = None, on_bad_rows: str = "stop",
                max_bad_share: float = 0.0, encoding: str = "utf-8", max_chars: int | None = None) -> Table:
    """One source read as `kind`. `encoding` decodes its text (UTF-8, with or without a byte-order mark, by
    default); `max_chars` (prepare.max_chars) is the longest string or message a row may hold."""
    import pandas as pd

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"unknown on_bad_rows {on_bad_rows!r} (known: {', '.join(ON_BAD_ROWS)})")
    path = str(path)
    records, unit, unreadable = read_records(path, encoding)
    if unreadable and (on_bad_rows == "stop" or not records):  # nothing readable: no layout to detect
        raise DataError([p for p, _ in unreadable])
    raw = {**{p.row: text for p, text in unreadable}, **dict(records)}  # as read, for the rejects file
    renamed = {ours: f"'{theirs}'" for theirs, ours in (columns or {}).items()}  # errors say where a column came from
    if columns:
        records = rename_columns(records, columns, path)
    layout = detect_layout(kind, columns_of(records), path)
    rows, problems = [], [p for p, _ in unreadable]
    for n, rec in records:
        try:
            row = layout.convert(rec)
        except _RowError as e:
            problems.append(Problem(path, failed(e.check, e.value, e.why), n, e.column, renamed.get(e.column), unit,
                                    e.check))
            continue
        rows.append({**row, "_source": path, "_row": n})
    schema_columns = list(SCHEMAS[kind].to_schema().columns)
    if rows:
        df = pd.DataFrame([[r[c] for c in schema_columns] for r in rows], columns=schema_columns,
                          index=[r["_row"] for r in rows], dtype=object)
        problems += validate_frame(df, kind, path, unit, {**renamed, **layout.origin},
                                   max_chars if max_chars is not None else MAX_CHARS)
    problems.sort(key=_by_place)
    if problems and (on_bad_rows == "stop" or any(p.row is None for p in problems)):  # no row: nothing to drop
        raise DataError(problems)

    bad = {p.row for p in problems}  # a row fails as a whole, however many of its checks failed
    total = len(raw)
    share = len(bad) / total
    if share > max_bad_share:
        raise DataError([Problem(path, f"{len(bad)} of {total} {unit}s are bad ({share:.1%}), more than "
                                       f"max_bad_share {max_bad_share:g} ({max_bad_share:.1%}) allows; "
                                       f"fix the data or raise the limit", check="max_bad_share"), *problems])
    rejects = [Reject(path, n, unit, [p for p in problems if p.row == n], raw[n]) for n in sorted(bad)]
    kept = [r for r in rows if r["_row"] not in bad]  # later steps (dedupe, split) see only these
    return Table(path, kind, layout.name, kept, rejects, total)


def read_sources(sources: Iterable, on_bad_rows: str = "stop", max_bad_share: float = 0.0,
                 max_chars: int | None = None) -> list[Table]:
    """Read and validate every source: a (path, kind[, columns[, encoding]]) tuple, or an object with those
    attributes (prepare's SourceConfig; `columns` and `encoding` optional). One DataError with the problems of all."""
    tables, problems = [], []
    for source in sources:
        if isinstance(source, (tuple, list)):
            path, kind, columns, encoding = (*source, None, None)[:4]
        else:
            path, kind = source.path, source.kind
            columns, encoding = getattr(source, "columns", None), getattr(source, "encoding", None)
        try:
            tables.append(read_source(path, kind, columns, on_bad_rows=on_bad_rows, max_bad_share=max_bad_share,
                                      encoding=encoding or "utf-8", max_chars=max_chars))
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    return tables
