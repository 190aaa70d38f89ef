"""The stage registry (posttrain.core.stages_registry) against what it describes: dvc.yaml and the stage modules."""

from __future__ import annotations

from pathlib import Path

import yaml

from posttrain.core.stages_registry import STAGES, names
from posttrain.tools import depgraph

REPO = Path(__file__).resolve().parent.parent


def test_registry_has_dvc_yamls_stages_and_the_shared_blocks_their_params_name():
    text = (REPO / "dvc.yaml").read_text()
    assert depgraph.registry_differences(text) == []
    dvc = yaml.safe_load(text)
    dvc["stages"]["evaluate"]["params"].remove("defaults.decode")
    del dvc["stages"]["sample"]
    problems = depgraph.registry_differences(yaml.safe_dump(dvc))
    assert problems == ["sample: in posttrain/core/stages_registry.py, not in dvc.yaml",
                        "evaluate: dvc.yaml params read defaults [], the registry says ['decode']"]


def test_launchable_stages_are_the_ones_that_start_through_launch():
    for stage in STAGES:
        source = (REPO / "stages" / f"{stage.name}.py").read_text()
        assert ("launchable=True" in source) == stage.launchable, stage.name


def test_every_training_stage_is_planned_and_launchable():
    from posttrain.train.plan import TRAINING_STAGES

    assert TRAINING_STAGES == names(trains=True) == names(launchable=True)
    assert "judge" in TRAINING_STAGES
