"""prepare: raw data in the formats people have -> validated, deduplicated, split data and the SFT mixture.

    python -m stages.prepare [--params params.yaml]

1. read and validate every source (posttrain.data.readers, schemas/), renaming mapped columns: on_bad_rows=stop
   stops at one bad row (file, row, column and check named) before writing anything; drop leaves bad rows out
   (rejects.jsonl) unless a source's share of them exceeds max_bad_share;
2. dedupe within each kind by normalised content (posttrain.data.overlap.normalise_text), first kept;
3. split each kind into train / eval by each source's `split` (posttrain/data/splitting.py): `auto` (the default) by
   a seeded hash of the normalised prompt, eval_fraction of the rows; `eval` every row held out (the sample's
   heldout_* files); `train` every row trained on. At most max_eval_per_suite rows of a kind are held out:
   auto rows beyond it go to train, eval-only rows are left out (never trained on);
4. drop from every train split the examples whose normalised prompt is held out in any kind's eval split;
5. drop from the corpus train split every document that contains an eval prompt, normalised: any
   decontaminate.ngram-gram of it, or the whole prompt when it is shorter (GPT-3's 13-gram check);
6. draw the SFT mixture at the configured ratios from the train splits (posttrain/data/mixing.py);
7. measure the n-gram overlap (overlap_ngrams) between the training files and each eval suite;
8. write everything to out_dir in one rename, metrics/prepare.json, and the MLflow run.

Outputs (OpenAI-style messages; TRL's prompt-completion / preference rows): corpus_{train,eval} {"text"};
sft_{train,eval} {"prompt", "completion", "source"}; eval_instruction / eval_cot {"prompt", "answer"};
eval_harmful / eval_benign {"prompt"}; preference_{train,eval,judge} {"prompt", "chosen", "rejected"} (judge: a
disjoint share of the train pairs); prompts {"prompt", "answer" or null}; rejects.jsonl (what drop left out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from posttrain.core.cli import run_stage
from posttrain.core.config import ConfigError, TrackingConfig
from posttrain.core.files import atomic_dir, write_json, write_jsonl
from posttrain.core.tracking import log_stage_metrics, stage_run
from posttrain.data.mixing import build_mixture, mixture_counts, outputs  # noqa: F401 (tests import mixture_counts)
from posttrain.data.readers import read_sources
from posttrain.data.splitting import (
    decontaminate,
    dedupe,
    judge_part,
    key_of,
    overlap_report,
    prompt_of,
    split,
    text_of,
)

SFT_KINDS = ("instruction", "refusal", "cot")
SPLIT_KINDS = ("corpus", "instruction", "refusal", "cot", "preference")  # prompts are not split
METRICS_FILE = "metrics/prepare.json"
REJECTS_FILE = "rejects.jsonl"  # in out_dir: versioned with the data it was left out of


@dataclass(frozen=True)
class SourceConfig:
    path: str
    kind: Literal["corpus", "instruction", "refusal", "cot", "preference", "prompt"]  # layout is auto-detected
    columns: dict[str, str] = field(default_factory=dict)  # {their column: our column}; most files need none
    split: Literal["auto", "train", "eval"] = "auto"  # auto: by hash; train / eval: every row there
    optional: bool = False  # true: a missing or empty file is no rows (votes the arena has not written yet)
    encoding: str = "utf-8"  # the file's text encoding, a Python codec name (latin-1, cp1252, utf-16); UTF-8 may have a BOM


@dataclass(frozen=True)
class MixtureConfig:
    size: int  # examples in sft_train.jsonl
    ratios: dict[str, float]  # kind -> share of the mixture; sums to 1

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"[prepare.mixture.size] must be at least 1, got {self.size}")
        unknown = sorted(set(self.ratios) - set(SFT_KINDS))
        if unknown:
            raise ConfigError(f"[prepare.mixture.ratios] unknown kind(s) {unknown} (known: {list(SFT_KINDS)})")
        negative = {k: r for k, r in self.ratios.items() if r < 0}
        if negative:
            raise ConfigError(f"[prepare.mixture.ratios] must not be negative, got {negative}")
        total = sum(self.ratios.values())
        if abs(total - 1) > 1e-6:
            raise ConfigError(f"[prepare.mixture.ratios] must sum to 1, got {total:g} ({self.ratios})")


@dataclass(frozen=True)
class DecontaminateConfig:
    ngram: int  # a corpus train document sharing an n-gram this long with an eval prompt is dropped
    min_tokens: int  # a shorter eval prompt counts whole, if it has at least this many tokens

    def __post_init__(self):
        if self.ngram < 1 or self.min_tokens < 1:
            raise ConfigError(f"[prepare.decontaminate] ngram and min_tokens must be >= 1, got {self}")


@dataclass(frozen=True)
class PrepareConfig:
    seed: int
    tracking: TrackingConfig
    sources: list[SourceConfig]
    eval_fraction: float  # held-out share of each kind's split: auto rows after dedupe
    max_eval_per_suite: int  # cap on each kind's eval split (auto rows past it train, eval-only ones are left out)
    mixture: MixtureConfig
    decontaminate: DecontaminateConfig
    overlap_ngrams: list[int]  # n-gram sizes of the train / eval overlap in metrics/prepare.json
    judge_share: float  # preference train pairs set apart for the judge (preference_judge.jsonl): never reward's
    on_bad_rows: Literal["stop", "drop"]  # drop: leave bad rows out, listed in out_dir/rejects.jsonl
    max_bad_share: float  # drop: a source with a larger share of bad rows still stops the stage
    max_chars: int  # longest string or message a row may hold (schemas' max_chars checks); longer rows are bad rows
    out_dir: str

    def __post_init__(self):
        if not 0 <= self.max_bad_share <= 1:
            raise ConfigError(f"[prepare.max_bad_share] must be in [0, 1], got {self.max_bad_share}")
        if not 0 <= self.judge_share < 1:
            raise ConfigError(f"[prepare.judge_share] must be in [0, 1), got {self.judge_share}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"[prepare.eval_fraction] must be in [0, 1), got {self.eval_fraction}")
        if self.max_eval_per_suite < 0:
            raise ConfigError(f"[prepare.max_eval_per_suite] must be >= 0, got {self.max_eval_per_suite}")
        if not self.sources:
            raise ConfigError("[prepare.sources] lists no sources")
        unsplit = [i for i, s in enumerate(self.sources) if s.kind == "prompt" and s.split == "eval"]
        if unsplit:
            raise ConfigError(f"[prepare.sources[{unsplit[0]}].split] prompts are not split: auto or train")
        if not self.overlap_ngrams or min(self.overlap_ngrams) < 1:
            raise ConfigError(f"[prepare.overlap_ngrams] must list sizes >= 1, got {self.overlap_ngrams}")
        kinds = {s.kind for s in self.sources}
        orphans = [k for k, r in self.mixture.ratios.items() if r > 0 and k not in kinds]
        if orphans:
            raise ConfigError(f"[prepare.mixture.ratios] {orphans} have a share but no source in prepare.sources")


def input_names(cfg: PrepareConfig) -> dict[str, str]:
    names: dict[str, str] = {}
    for i, s in enumerate(present(cfg.sources)):
        name = Path(s.path.removesuffix(".gz")).stem
        names[name if name not in names else f"{name}_{i}"] = s.path
    return names


def present(sources: list[SourceConfig]) -> list[SourceConfig]:
    """The sources to read: an optional one whose file is missing or empty has no rows yet."""
    return [s for s in sources if not (s.optional and (not Path(s.path).is_file() or Path(s.path).stat().st_size == 0))]


def run(cfg: PrepareConfig) -> dict:
    sources = present(cfg.sources)
    tables = read_sources(sources, cfg.on_bad_rows, cfg.max_bad_share,  # raises DataError; nothing written yet
                          max_chars=cfg.max_chars)
    rejects = [r.to_json() for t in tables for r in t.rejects]
    rows: dict[str, list[dict]] = {kind: [] for kind in (*SPLIT_KINDS, "prompt")}
    for t, source in zip(tables, sources):  # read_sources keeps the order of the sources
        rows[t.kind] += [{**r, "_split": source.split} for r in t.rows]
    unique = {kind: dedupe(kind, r) for kind, r in rows.items()}

    train, held = {}, {}
    for kind in SPLIT_KINDS:
        train[kind], held[kind] = split(kind, unique[kind], cfg.eval_fraction, cfg.max_eval_per_suite, cfg.seed)
    train["prompt"] = unique["prompt"]
    held_out = {key_of(k, r) for k in SPLIT_KINDS if k != "corpus" for r in held[k]}
    clean = {k: [r for r in v if k == "corpus" or key_of(k, r) not in held_out] for k, v in train.items()}
    eval_prompts = [text_of(prompt_of(k, r)) for k in SPLIT_KINDS if k != "corpus" for r in held[k]]
    clean["corpus"] = decontaminate(clean["corpus"], eval_prompts, cfg.decontaminate.ngram,
                                    cfg.decontaminate.min_tokens)

    sft_kinds = [k for k in SFT_KINDS if cfg.mixture.ratios.get(k, 0) > 0]
    ratios = {k: cfg.mixture.ratios[k] for k in sft_kinds}
    mixture, mixture_report = build_mixture(clean, cfg.mixture.size, ratios, cfg.seed)
    clean["preference"], judge = judge_part(clean["preference"], cfg.judge_share, cfg.seed)
    files = outputs(clean, held, clean["prompt"], mixture, sft_kinds, judge)

    metrics = {
        "sources": {t.path: {"kind": t.kind, "layout": t.layout, "rows": len(t.rows), "dropped": len(t.rejects),
                             "dropped_share": len(t.rejects) / t.total} for t in tables},
        "dropped": len(rejects),  # bad rows left out (on_bad_rows=drop), all in out_dir/rejects.jsonl
        "dedupe": {k: {"rows": len(rows[k]), "duplicates": len(rows[k]) - len(unique[k]), "unique": len(unique[k])}
                   for k in rows},
        "split": {k: {"train": len(clean[k]), "eval": len(held[k])} for k in SPLIT_KINDS},
        "eval_only_left_out": {k: sum(r["_split"] == "eval" for r in unique[k])
                               - sum(r["_split"] == "eval" for r in held[k]) for k in SPLIT_KINDS},  # past the cap
        "held_out_prompts_dropped_from_train": {k: len(train[k]) - len(clean[k]) for k in train if k != "corpus"},
        "decontaminate": {"ngram": cfg.decontaminate.ngram, "min_tokens": cfg.decontaminate.min_tokens,
                          "eval_prompts": len(eval_prompts), "corpus_checked": len(train["corpus"]),
                          "corpus_dropped": len(train["corpus"]) - len(clean["corpus"])},
        "mixture": mixture_report,
        "outputs": {name.removesuffix(".jsonl"): len(r) for name, r in files.items()},
        "overlap": overlap_report(files, cfg.overlap_ngrams),
    }
    with stage_run("prepare", cfg, inputs=input_names(cfg)):
        with atomic_dir(cfg.out_dir) as tmp:
            for name, out_rows in files.items():
                write_jsonl(tmp / name, out_rows)
            write_jsonl(tmp / REJECTS_FILE, rejects)
        write_json(METRICS_FILE, metrics)
        log_stage_metrics(metrics)
    return metrics


if __name__ == "__main__":
    run_stage("prepare", PrepareConfig, run)
