"""Element checks shared by the data contracts, and `explain` to say why a value failed one.

Each check takes one cell and returns True when the cell is fine. A check skips values of the wrong
type (returns True): the column's dtype check, or `message_list`, reports those once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

MAX_CHARS = 100_000  # any one string: a corpus document, a message, a response (default of prepare.max_chars)
_LIMIT = [MAX_CHARS]  # the limit the checks apply now (char_limit sets it for one validation)
ROLES = ("system", "user", "assistant")


def non_empty(x: Any) -> bool:
    return not isinstance(x, str) or bool(x.strip())


@contextlib.contextmanager
def char_limit(limit: int | None) -> Iterator[int]:
    """Apply `limit` (None: MAX_CHARS) as max_chars / messages_max_chars while the block validates."""
    old = _LIMIT[0]
    _LIMIT[0] = MAX_CHARS if limit is None else limit
    try:
        yield _LIMIT[0]
    finally:
        _LIMIT[0] = old


def max_chars(x: Any) -> bool:
    return not isinstance(x, str) or len(x) <= _LIMIT[0]


# ---------------------------------------------------------------- message lists [{"role", "content"}]


def message_list(x: Any) -> bool:
    """A non-empty list of {"role": str, "content": str} and nothing else."""
    return (
        isinstance(x, list) and len(x) > 0
        and all(isinstance(m, dict) and set(m) == {"role", "content"}
                and isinstance(m["role"], str) and isinstance(m["content"], str) for m in x)
    )


def known_roles(x: Any) -> bool:
    return not message_list(x) or all(m["role"] in ROLES for m in x)


def non_empty_content(x: Any) -> bool:
    return not message_list(x) or all(m["content"].strip() for m in x)


def messages_max_chars(x: Any) -> bool:
    return not message_list(x) or all(len(m["content"]) <= _LIMIT[0] for m in x)


def has_user(x: Any) -> bool:
    return not message_list(x) or any(m["role"] == "user" for m in x)


def ends_with(role: str):
    def check(x: Any) -> bool:
        return not message_list(x) or x[-1]["role"] == role
    return check


def explain(check: str, value: Any) -> str | None:
    """A specific reason for a failed message check (None: showing the value says it all)."""
    if not message_list(value):
        return None
    if check == "known_roles":
        bad = sorted({m["role"] for m in value if m["role"] not in ROLES})
        return f"unknown role(s) {', '.join(map(repr, bad))}; allowed: {', '.join(ROLES)}"
    if check == "non_empty_content":
        i = next(i for i, m in enumerate(value) if not m["content"].strip())
        return f"message {i} ({value[i]['role']}) has empty content"
    if check in ("ends_with_assistant", "ends_with_user"):
        return f"last message is from {value[-1]['role']!r}"
    if check == "messages_max_chars":
        longest = max(len(m["content"]) for m in value)
        return f"a message has {longest} chars (max {_LIMIT[0]})"
    return None
