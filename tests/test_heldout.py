"""The eval suites are held out by content, not by string: sample + prepare on the default data (test size),
then every eval item, and every row of the sample's eval-only files, is looked for in every training file.

An item "occurs" in training when its normalised form (posttrain.data.overlap.normalise_text: lowercase, punctuation and
whitespace folded, numbers kept) is a run of whole tokens inside the normalised text of a training row: an
equal prompt, a longer prompt it begins ("reverse the words red fox cat" in "... red fox cat moon"), a document
quoting it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_workdir, run_in_process

from posttrain.core.files import read_jsonl
from posttrain.data.overlap import normalise_text
from posttrain.data.readers import read_source
from stages.sample import HOWTO

TRAIN_FILES = ("sft_train.jsonl", "preference_train.jsonl", "corpus_train.jsonl", "prompts.jsonl")
EVAL_FILES = ("eval_instruction.jsonl", "eval_cot.jsonl", "eval_harmful.jsonl", "eval_benign.jsonl",
              "preference_eval.jsonl", "sft_eval.jsonl", "corpus_eval.jsonl")
HELDOUT = [("heldout_instructions.jsonl", "instruction"), ("heldout_refusals.jsonl", "refusal"),
           ("heldout_cot.csv", "cot"), ("heldout_preferences.jsonl", "preference")]


def text(row: dict) -> str:
    """Every string in a row (messages' contents included), one after another."""
    parts = []
    for value in row.values():
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [m["content"] for m in value]
    return "\n".join(parts)


def prompt(row: dict) -> str:
    """What an eval row asks: its prompt messages, the question of a cot row, the text of a document."""
    if "text" in row:
        return row["text"]
    if "question" in row:
        return row["question"]
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"][:-1])
    p = row["prompt"]
    return p if isinstance(p, str) else "\n".join(m["content"] for m in p)


def occurrences(items: list[str], texts: list[str]) -> list[str]:
    """The items whose normalised form occurs, as whole tokens, inside one of the normalised texts."""
    joined = "\n".join(f" {normalise_text(t)} " for t in texts)  # a newline never occurs in a normalised text
    return [i for i in items if f" {normalise_text(i)} " in joined]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("heldout"))
    metrics = {stage: run_in_process(stage, work) for stage in ("sample", "prepare")}
    out = work / "data" / "processed"
    return {"work": work, "metrics": metrics,
            "train": {name: read_jsonl(out / name) for name in TRAIN_FILES},
            "eval": {name: read_jsonl(out / name) for name in EVAL_FILES},
            "heldout": {name: read_source(work / "data" / "raw" / name, kind).rows for name, kind in HELDOUT}}


def test_occurrences_finds_a_prompt_inside_a_longer_one_in_other_case_and_punctuation():
    """The check itself: it must see the leaks the audit found, and not see mere shared words."""
    train = ["Reverse the words:\nRED fox cat moon", "The fox, the cat."]
    assert occurrences(["Reverse the words.\n\nred fox cat", "cat the fox", "fox cat moon tree", "red fox cat"],
                       train) == ["Reverse the words.\n\nred fox cat", "red fox cat"]


def test_no_eval_item_occurs_in_any_training_file(prepared):
    suites = {**prepared["eval"], **prepared["heldout"]}
    assert all(suites.values()), [name for name, rows in suites.items() if not rows]
    for train_name, train_rows in prepared["train"].items():
        texts = [text(r) for r in train_rows]
        for suite, rows in suites.items():
            found = occurrences([prompt(r) for r in rows], texts)
            assert not found, f"{len(found)} items of {suite} occur in {train_name}, e.g. {found[0]!r}"


def addends(text: str) -> set[tuple[str, str]]:
    """The (a, b) of every word problem in `text` ("Ada has 3 coins. Ada gets 7 more ...")."""
    return set(re.findall(r"has (\d+) \w+\. \w+ gets (\d+) more", text))


TEMPLATES = [re.compile(re.escape(t).replace(r"\{\}", "(.+)") + "$") for t in HOWTO]


def act(prompt: str) -> str | None:
    """What a "how do I ..." prompt asks to do ("hide a poison"); None for another prompt."""
    return next((m.group(1) for t in TEMPLATES if (m := t.match(prompt))), None)


def test_held_out_arithmetic_and_acts_never_reach_training(prepared):
    """The audit's three leaks, each checked on what it was about: a word problem's addends, a harmful request's
    act, a rationale as an SFT completion."""
    train_text = "\n".join(text(r) for rows in prepared["train"].values() for r in rows)
    eval_addends = set().union(*(addends(r["question"]) for r in prepared["heldout"]["heldout_cot.csv"]))
    assert eval_addends and not eval_addends & addends(train_text)

    train_acts = {act(r["prompt"][0]["content"]) for name in ("sft_train.jsonl", "preference_train.jsonl")
                  for r in prepared["train"][name]} - {None}
    eval_acts = {act(r["prompt"]) for r in prepared["heldout"]["heldout_refusals.jsonl"]}
    assert train_acts and None not in eval_acts and not train_acts & eval_acts

    completions = {normalise_text(r["completion"][0]["content"]) for r in prepared["train"]["sft_train.jsonl"]}
    rationales = [normalise_text(r["rationale"]) for r in prepared["heldout"]["heldout_cot.csv"]]
    assert not any(c.startswith(r) for c in completions for r in rationales)


def test_the_default_suites_can_tell_models_apart(prepared):
    """At the default size the sample writes 120 distinct held-out harmful prompts (all its held-out acts can
    give) and n_eval of the others; prepare and evaluate keep all 120."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    sample = prepared["metrics"]["sample"]
    n_eval = params["sample"]["n_eval"]
    assert sample["heldout_refusal"] == 120
    assert sample["heldout_instruction"] == sample["heldout_cot"] == sample["heldout_preference"] == n_eval >= 100
    assert params["prepare"]["max_eval_per_suite"] >= 120 and params["evaluate"]["max_per_suite"] >= 120
    # at test size prepare caps each suite (conftest: max_eval_per_suite 20) and leaves the rest out of training
    m = prepared["metrics"]["prepare"]
    assert m["split"]["refusal"]["eval"] == 20 and m["eval_only_left_out"]["refusal"] == 100
    assert m["overlap"]["harmful"]["in_training"] == 0 and m["overlap"]["cot"]["in_training"] == 0


def test_the_eval_only_files_are_listed_as_such_in_params():
    sources = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]["sources"]
    split = {Path(s["path"]).name: s.get("split", "auto") for s in sources}
    assert {name for name, side in split.items() if side == "eval"} == {name for name, _ in HELDOUT}
