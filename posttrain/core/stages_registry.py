"""The stages of the lifecycle, once: what each one is, for the tools that need to know without running it.

dvc.yaml stays the truth for how a stage runs (its cmd, deps, outs, order); this table says what kind of stage
it is. launch (which stages re-execute under `accelerate launch`), plan (which stages it estimates), the arena
(which model folders it offers) and the tests read it; `python -m posttrain.tools.depgraph --check` checks that the
shared blocks listed here are the `defaults.*` params dvc.yaml gives each stage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the dvc.yaml stage and its module, stages/<name>.py
    trains: bool = False  # fits a model with a trainer: posttrain.train.plan estimates its memory
    launchable: bool = False  # `run_stage(..., launchable=True)`: re-executes under accelerate launch
    shared: tuple[str, ...] = ()  # the params.yaml `defaults` blocks it reads (adapter, train, decode)
    chat_model: bool = False  # writes a chat model to models/<name>: one of the lineage the arena and evaluate compare


_TRAINER = {"trains": True, "launchable": True, "shared": ("adapter", "train")}

# upstream first; the lineage's models in the order the arena lists them
STAGES = (
    Stage("sample"),
    Stage("prepare"),
    Stage("base", chat_model=True),
    Stage("cpt", **_TRAINER, chat_model=True),
    Stage("sft", **_TRAINER, chat_model=True),
    Stage("reward", **_TRAINER),
    Stage("judge", **_TRAINER),
    Stage("rft", trains=True, launchable=True, shared=("adapter", "train", "decode"), chat_model=True),
    Stage("align", trains=True, launchable=True, shared=("adapter", "train", "decode"), chat_model=True),
    Stage("distill", trains=True, launchable=True, shared=("train", "decode"), chat_model=True),
    Stage("evaluate", shared=("decode",)),
    Stage("export", chat_model=True),  # reads the whole params.yaml (the model card lists it)
)
BY_NAME = {s.name: s for s in STAGES}


def names(**having: bool) -> tuple[str, ...]:
    """The stages' names, upstream first, of those whose fields equal `having`: names(trains=True)."""
    return tuple(s.name for s in STAGES if all(getattr(s, k) == v for k, v in having.items()))
