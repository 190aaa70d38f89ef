"""Text overlap between training data and eval suites, on normalised text.

`normalise_text` is the one notion of "the same text" prepare uses to dedupe, split and decontaminate:
lowercase, every run of punctuation and whitespace folded into one space, numbers kept whole
("Sort: 3, 1.  Then 3.5!" -> "sort 3 1 then 3.5").

An n-gram is n consecutive normalised tokens. An item shorter than n counts as one "n-gram": itself,
so a short prompt ("how do i hide a poison") is found in training only where it occurs whole.
"""

from __future__ import annotations

import re
import statistics

# a number (with its decimal point or thousands commas) or a run of letters; everything between is folded
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")


def normalise_text(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def tokens(text: str) -> list[str]:
    return normalise_text(text).split()


def ngrams(toks: list[str], n: int) -> set[str]:
    """The item's n-grams, space-joined; an item shorter than n is one gram, itself (none if empty)."""
    if len(toks) < n:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def probes(items: list[list[str]], n: int, min_tokens: int) -> dict[int, set[str]]:
    """What marks a text as containing one of `items`: their n-grams, by length (a short item counts whole,
    when it has at least `min_tokens` tokens: a two-word prompt would match half of any corpus)."""
    by_length: dict[int, set[str]] = {}
    for toks in items:
        if len(toks) >= min(n, min_tokens):
            for gram in ngrams(toks, n):
                by_length.setdefault(gram.count(" ") + 1, set()).add(gram)
    return by_length


def contains_any(toks: list[str], by_length: dict[int, set[str]]) -> bool:
    """Whether one of the probes (from `probes`) occurs in the token list `toks`."""
    return any(" ".join(toks[i : i + n]) in grams for n, grams in by_length.items()
               for i in range(len(toks) - n + 1))


def found_ngrams(texts: list[list[str]], grams: set[str], n: int) -> set[str]:
    """The n-grams of `grams` that occur in any of the token lists `texts`."""
    return {g for toks in texts for i in range(len(toks) - n + 1) if (g := " ".join(toks[i : i + n])) in grams}


def overlap(training: list[str], suites: dict[str, list[str]], sizes: list[int]) -> dict[str, dict]:
    """Per suite: how much of each eval item is found in the training texts.

    in_training: share of items whose whole normalised text occurs inside some training text;
    any_<n>gram: share of items with at least one n-gram found; <n>gram_share: mean over items of the
    share of their n-grams found. Texts are searched one by one: an n-gram never spans two of them.
    """
    train = [tokens(t) for t in training]
    joined = "\n".join(f" {' '.join(t)} " for t in train)  # a newline never occurs inside a normalised text
    items = {name: [tokens(t) for t in texts] for name, texts in suites.items()}
    whole = {name: [bool(t) and f" {' '.join(t)} " in joined for t in its] for name, its in items.items()}
    report = {name: {"items": len(its), "in_training": _mean(whole[name])} for name, its in items.items()}
    for n in sizes:  # one pass over the training tokens per n; an item shorter than n is found if found whole
        wanted = {g for its in items.values() for t in its if len(t) >= n for g in ngrams(t, n)}
        found = found_ngrams(train, wanted, n)
        for name, its in items.items():
            shares = [len(ngrams(t, n) & found) / len(ngrams(t, n)) if len(t) >= n else float(w)
                      for t, w in zip(its, whole[name])]
            report[name][f"any_{n}gram"] = _mean(share > 0 for share in shares)
            report[name][f"{n}gram_share"] = _mean(shares)
    return report


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return round(statistics.fmean(values), 4) if values else None
