"""Public benchmarks through lm-evaluation-harness, read from local files in the benchmarks' published layouts.

    evaluate:
      benchmarks:                       # {} turns them off
        gsm8k: {file: data/gsm8k/test.jsonl, format: gsm8k, limit: 100, num_fewshot: 5}
        arc:   {file: ARC-Challenge/test-00000-of-00001.parquet, format: arc, limit: 100}

Formats (the layouts the benchmarks are published in; .jsonl, .json, .parquet, and .csv where flat):
- gsm8k: `question`, `answer` = worked solution ending `#### N`. Generative: greedy answer, scored by exact match of
  the number after `####` (lm-eval's gsm8k "strict-match"; its "flexible-extract", the last number in the
  answer, is reported beside it).
- arc: `question`, `choices: {text: [...], label: [...]}`, `answerKey` (the Hugging Face release), or the original
  AI2 JSONL (`question: {stem, choices: [{text, label}]}`, `answerKey`). Multiple choice by log-likelihood: acc
  (acc_norm beside it).
- mmlu: `question`, `choices` (list), `answer` (index, or letter); or the original headerless CSV
  (question, A, B, C, D, answer letter). Multiple choice over the letters A-D by log-likelihood: acc.

`file: embedded` is a small set in the format's layout generated (seeded) from the sample data's world, so the
default lifecycle shows a benchmark column with no download: it shows that the harness runs and what the lineage
learned on that world, not general ability.

The tasks are lm-eval `ConfigurableTask`s built here (the same fields as lm-eval's own gsm8k / arc_easy / mmlu
YAML, with `dataset_path: json|parquet|csv` and `dataset_kwargs.data_files` pointing at the local file), run with
lm-eval's task API `lm_eval.evaluator.evaluate` over `HFLM(pretrained=model, tokenizer=tokenizer)`: the model
evaluate already loaded (adapter chains merged). `simple_evaluate` is that call plus the seeds set here and a
record of the environment (`pip list` and other subprocesses, about 1 s a task) that we do not keep. Nothing
reaches a hub. `chat_template: true` renders each prompt with the model's chat
template (lm-eval's apply_chat_template; few-shot examples as alternating turns) - see docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.core.config import ConfigError, StageError
from posttrain.evaluation.stats import rate

EMBEDDED = "embedded"  # `file: embedded`: the generated set
EMBEDDED_ROWS = 100
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # datasets' packaged loaders
MMLU_CSV_COLUMNS = ["question", "A", "B", "C", "D", "answer"]  # the original release: no header row
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark task of `evaluate.benchmarks` (the task's name is its key there)."""

    file: str  # a local file in the format's published layout (.jsonl/.json/.parquet/.csv), or `embedded`
    format: Literal["gsm8k", "arc", "mmlu"]
    limit: int = 0  # score the first this many items; 0 = all
    num_fewshot: int = 0  # worked examples put before each item
    fewshot_file: str = ""  # where they come from ("": the same file, never the item itself)
    chat_template: bool = True  # prompt through the model's chat template (lm-eval's apply_chat_template)
    max_new_tokens: int = 256  # generative formats (gsm8k): answer length


# ---------------------------------------------------------------- formats: lm-eval task fields, checks, primary metric

def _gsm8k_task() -> dict:  # lm-eval 0.4.13 tasks/gsm8k/gsm8k.yaml, less its hub dataset
    return {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False},
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                    {"function": "take_first"}]},
        ],
        "metadata": {"version": 3.0},
    }


def _arc_task() -> dict:  # lm-eval 0.4.13 tasks/arc/arc_easy.yaml
    return {
        "output_type": "multiple_choice",
        "process_docs": _arc_docs,
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _mmlu_task() -> dict:  # lm-eval 0.4.13 tasks/mmlu/default/_default_template_yaml
    return {
        "output_type": "multiple_choice",
        "process_docs": _mmlu_docs,
        "fewshot_config": {"sampler": "first_n"},
        "description": "{% if subject is defined and subject %}The following are multiple choice questions (with "
                       "answers) about {{ subject.replace('_', ' ') }}.\n\n{% endif %}",  # lm-eval's, per subject
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


@dataclass(frozen=True)
class Format:
    task: Callable[[], dict]  # -> lm-eval's task fields
    columns: tuple[str, ...]  # what a row must hold
    metric: str  # the primary metric: the table's column
    filter: str  # the lm-eval filter whose per-item scores give the flags
    also: dict  # other reported values: name -> "metric,filter" in lm-eval's results
    csv: bool  # a flat layout that a CSV can hold


FORMATS = {
    "gsm8k": Format(_gsm8k_task, ("question", "answer"), "exact_match", "strict-match",
                    {"flexible_extract": "exact_match,flexible-extract"}, csv=True),
    "arc": Format(_arc_task, ("question", "answerKey"), "acc", "none", {"acc_norm": "acc_norm,none"}, csv=False),
    "mmlu": Format(_mmlu_task, ("question", "choices", "answer"), "acc", "none", {}, csv=True),
}


def _arc_docs(dataset):
    """The original AI2 layout (question: {stem, choices: [{text, label}]}) as the Hugging Face one."""
    if "choices" in dataset.column_names:
        return dataset

    def flat(doc):
        q = doc["question"]
        return {"question": q["stem"], "choices": {"text": [c["text"] for c in q["choices"]],
                                                   "label": [c["label"] for c in q["choices"]]}}
    return dataset.map(flat)


def _mmlu_docs(dataset):
    """The original CSV (A-D columns, a letter answer) and letter answers as the Hugging Face layout."""
    if "choices" not in dataset.column_names:
        dataset = dataset.map(lambda d: {"choices": [str(d[c]) for c in "ABCD"]}, remove_columns=list("ABCD"))
    if isinstance(dataset[0]["answer"], str):  # a new int column: map() would keep the string type
        dataset = dataset.map(lambda d: {"index": LETTERS.index(d["answer"].strip().upper())},
                              remove_columns=["answer"]).rename_column("index", "answer")
    return dataset


# ---------------------------------------------------------------- checks (before any model loads)

def _first_row(path: Path, fmt: str) -> dict | None:
    """The file's first row as a mapping (None: no rows); raises ValueError when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open() as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
        return None
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError("a .json file must hold a list of rows (JSON Lines: use .jsonl)")
        return data[0] if data else None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        table = parquet.read_row_group(0) if parquet.num_row_groups else None
        return table.slice(0, 1).to_pylist()[0] if table is not None and table.num_rows else None
    with path.open(newline="") as f:
        if fmt == "mmlu" and _headerless(path):  # the original release
            row = next(csv.reader(f), None)
            return None if row is None else dict(zip(MMLU_CSV_COLUMNS, row)) if len(row) == 6 else {}
        return next(csv.DictReader(f), None)


def _headerless(path: Path) -> bool:
    """A CSV whose first row is data (MMLU's original files), not column names."""
    with path.open(newline="") as f:
        return "question" not in next(csv.reader(f), [])


def _check_file(where: str, file: str, fmt: str) -> Path:
    """The path of a benchmark file whose layout fits `fmt`, else a ConfigError naming `where`."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"[{where}] no such file: {file} (a local file in the {fmt} layout, or `{EMBEDDED}`)")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS or (suffix == ".csv" and not FORMATS[fmt].csv):
        kinds = [s for s in BUILDERS if s != ".csv" or FORMATS[fmt].csv]
        raise ConfigError(f"[{where}] {file}: {fmt} files are read from {', '.join(kinds)}")
    try:
        row = _first_row(path, fmt)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"[{where}] {file}: cannot be read as {suffix}: {e}") from e
    if row is None:
        raise ConfigError(f"[{where}] {file}: no rows")
    if not isinstance(row, dict):
        raise ConfigError(f"[{where}] {file}: rows must be objects with named fields, the first is {row!r:.80}")
    missing = [c for c in FORMATS[fmt].columns if c not in row]
    if fmt == "arc" and "choices" not in row and not isinstance(row.get("question"), dict):
        missing.append("choices")
    if fmt == "mmlu" and suffix == ".csv" and missing:
        missing = [] if set(MMLU_CSV_COLUMNS) <= set(row) else ["question, A, B, C, D, answer"]
    if missing:
        raise ConfigError(f"[{where}] {file}: no column {', '.join(missing)} in its first row (the {fmt} layout: "
                          f"{', '.join(FORMATS[fmt].columns)}; found {', '.join(map(str, row)) or 'none'})")
    if fmt == "gsm8k" and "####" not in str(row["answer"]):
        raise ConfigError(f"[{where}] {file}: the first answer has no '#### N' final answer (the gsm8k layout)")
    return path


def check(benchmarks: dict[str, BenchmarkConfig], taken: tuple[str, ...] = ()) -> None:
    """Every benchmark's format, file and layout, and its name (a column of evaluate's table, so none of `taken`).
    Raises ConfigError naming `evaluate.benchmarks.<task>.<key>`."""
    for name, b in benchmarks.items():
        where = f"evaluate.benchmarks.{name}"
        if name in taken:
            raise ConfigError(f"[{where}] '{name}' is already a column of the evaluate table: name the task otherwise")
        if b.format not in FORMATS:
            raise ConfigError(f"[{where}.format] must be one of {list(FORMATS)}, got {b.format!r}")
        for key in ("limit", "num_fewshot"):
            if getattr(b, key) < 0:
                raise ConfigError(f"[{where}.{key}] must be >= 0, got {getattr(b, key)}")
        if b.max_new_tokens < 1:
            raise ConfigError(f"[{where}.max_new_tokens] must be >= 1, got {b.max_new_tokens}")
        if b.file != EMBEDDED:
            _check_file(f"{where}.file", b.file, b.format)
        if b.fewshot_file:
            _check_file(f"{where}.fewshot_file", b.fewshot_file, b.format)


# ---------------------------------------------------------------- the embedded set

NAMES = ["Sam", "Ada", "Lee", "Mia", "Tom", "Eva", "Ben", "Zoe"]  # the sample data's world (stages/sample.py)
ITEMS = ["apples", "coins", "books", "shells", "pens", "cards"]
WORDS = ["red", "blue", "green", "fox", "owl", "cat", "river", "stone", "moon", "tree", "lamp", "boat",
         "apple", "cloud", "bell", "sand", "wolf", "rain", "gold", "seed"]


def _word_problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = rng.randint(1, min(9, a + b))
    return {"question": f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
                        f"How many {item} does {name} have now?",
            "answer": f"{name} starts with {a}. {a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.\n#### {a + b - c}"}


def _choice_item(rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, right answer, three wrong ones) from the sample data's instruction tasks."""
    family = rng.choice(["sum", "count", "sort", "reverse"])
    if family == "sum":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = rng.sample([x for x in range(a + b - 3, a + b + 4) if x >= 0 and x != a + b], 3)
        return f"What is {a} plus {b}?", str(a + b), [str(x) for x in wrong]
    if family == "count":
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        wrong = rng.sample([x for x in range(1, 10) if x != len(words)], 3)
        return f"Count the words.\n\n{' '.join(words)}", str(len(words)), [str(x) for x in wrong]
    if family == "sort":
        nums = rng.sample(range(10), rng.randint(3, 5))
        return f"Sort the numbers.\n\n{' '.join(map(str, nums))}", " ".join(map(str, sorted(nums))), \
            _shuffles(rng, list(map(str, sorted(nums))))
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Reverse the words.\n\n{' '.join(words)}", " ".join(reversed(words)), _shuffles(rng, words[::-1])


def _shuffles(rng: random.Random, right: list[str], k: int = 3) -> list[str]:
    """k different orders of `right`'s (distinct) tokens, none of them `right`'s own."""
    wrong: set[str] = set()
    while len(wrong) < k:
        order = rng.sample(right, len(right))
        if order != right:
            wrong.add(" ".join(order))
    return sorted(wrong)


def embedded_rows(fmt: str, n: int, seed: int) -> list[dict]:
    """n rows in `fmt`'s published layout, generated from the sample data's world (deterministic for a seed)."""
    rng = random.Random(f"{seed}-{fmt}")
    if fmt == "gsm8k":
        return [_word_problem(rng) for _ in range(n)]
    rows = []
    for i in range(n):
        question, right, wrong = _choice_item(rng)
        choices = [right, *wrong]
        rng.shuffle(choices)
        key = choices.index(right)
        if fmt == "arc":
            rows.append({"id": f"embedded-{i}", "question": question,
                         "choices": {"text": choices, "label": list(LETTERS[: len(choices)])}, "answerKey": LETTERS[key]})
        else:
            rows.append({"question": question, "subject": "", "choices": choices, "answer": key})
    return rows


# ---------------------------------------------------------------- running

class BenchmarkRunner:
    """The configured benchmarks, checked at construction (before any model loads), scored per model by `run`.

    Embedded sets and the datasets cache of the local files live in a temporary folder, removed by `close`
    (or when the runner is collected)."""

    def __init__(self, benchmarks: dict[str, BenchmarkConfig], seed: int, batch_size: int,
                 taken: tuple[str, ...] = ()):
        check(benchmarks, taken)
        self.benchmarks, self.seed, self.batch_size = benchmarks, seed, batch_size
        self._tmp = tempfile.TemporaryDirectory(prefix="benchmarks-") if benchmarks else None
        self.files: dict[str, Path] = {}
        for name, b in benchmarks.items():
            if b.file == EMBEDDED:
                path = Path(self._tmp.name) / f"{name}.jsonl"
                rows = embedded_rows(b.format, b.limit or EMBEDDED_ROWS, seed)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                self.files[name] = path
            else:
                self.files[name] = Path(b.file).resolve()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def task(self, name: str):
        """lm-eval's ConfigurableTask for benchmark `name`, its data read from the local file."""
        from lm_eval.api.task import ConfigurableTask

        b, fmt = self.benchmarks[name], FORMATS[self.benchmarks[name].format]
        path = self.files[name]
        data_files = {"test": str(path)}
        if b.fewshot_file:
            data_files["train"] = str(Path(b.fewshot_file).resolve())
        kwargs = {"data_files": data_files, "cache_dir": str(Path(self._tmp.name) / "datasets")}
        if path.suffix.lower() == ".csv" and b.format == "mmlu" and _headerless(path):
            kwargs["column_names"] = MMLU_CSV_COLUMNS
        config = {**fmt.task(), "task": name, "dataset_path": BUILDERS[path.suffix.lower()], "dataset_kwargs": kwargs,
                  "test_split": "test", "fewshot_split": "train" if b.fewshot_file else "test",
                  "num_fewshot": b.num_fewshot}
        if "generation_kwargs" in config:
            config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": b.max_new_tokens}
        return ConfigurableTask(config=config)

    def run(self, model, tokenizer, flags: dict | None = None, samples: list | None = None,
            n_samples: int = 0) -> dict[str, dict]:
        """Every benchmark's score of one model: task -> {metric, value, n, low, high (95 % Wilson), stderr
        (lm-eval's), and the format's other values}. `flags`, if given, receives each task's pass / fail per item
        (for paired tests against another model); `samples`, the first `n_samples` items of each task as
        (task, question, model's answer, reference)."""
        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        out = {}
        with _quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            for name, b in self.benchmarks.items():
                if b.chat_template and not tokenizer.chat_template:
                    raise StageError(f"[evaluate.benchmarks.{name}.chat_template] true, but the model's tokenizer "
                                     "has no chat template: set it false for this model")
                fmt = FORMATS[b.format]
                print(f"[evaluate] benchmark {name} ({b.format}, {self.files[name].name})", flush=True)
                random.seed(self.seed)  # as simple_evaluate seeds (greedy decoding: the few-shot draw is what varies)
                np.random.seed(self.seed)
                torch.manual_seed(self.seed)
                task = self.task(name)
                task.set_fewshot_seed(seed=self.seed)
                res = evaluate(lm=lm, task_dict={"tasks": {name: task}}, limit=b.limit or None, log_samples=True,
                               bootstrap_iters=1000, apply_chat_template=b.chat_template,
                               fewshot_as_multiturn=b.chat_template)
                items = sorted((s for s in res["samples"][name] if s["filter"] == fmt.filter),
                               key=lambda s: int(s["doc_id"]))
                passed = [bool(s[fmt.metric]) for s in items]
                scores, r = res["results"][name], rate(passed)
                if abs(r["value"] - scores[f"{fmt.metric},{fmt.filter}"]) > 1e-9:  # the items are the score
                    raise RuntimeError(f"benchmark {name}: lm-eval's {fmt.metric} is "
                                       f"{scores[f'{fmt.metric},{fmt.filter}']}, its items give {r['value']}")
                stderr = scores.get(f"{fmt.metric}_stderr,{fmt.filter}")
                out[name] = {"metric": fmt.metric, **r, "stderr": stderr if isinstance(stderr, float) else None,
                             **{k: scores.get(v) for k, v in fmt.also.items()}}
                if flags is not None:
                    flags[name] = passed
                if samples is not None:
                    samples += [(name, *_shown(s, b.format)) for s in items[:n_samples]]
        return out


def _shown(sample: dict, fmt: str) -> tuple[str, str, str]:
    """(question, model's answer, reference) of one lm-eval sample, for the report."""
    doc = sample["doc"]
    question = doc["question"]["stem"] if isinstance(doc["question"], dict) else doc["question"]
    if fmt == "gsm8k":
        return question, sample["resps"][0][0], str(doc["answer"]).split("####")[-1].strip()
    lls = [r[0] for r in sample["filtered_resps"]]
    choices = _choices(doc, fmt)
    target = int(sample["target"]) if str(sample["target"]).isdigit() else 0
    return question, choices[max(range(len(lls)), key=lls.__getitem__)], choices[target]


def _choices(doc: dict, fmt: str) -> list[str]:
    if fmt == "mmlu":
        return list(doc["choices"]) if "choices" in doc else [str(doc[c]) for c in "ABCD"]
    return list(doc["choices"]["text"])


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning per run for a model passed as an object and for `limit`; keep errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
