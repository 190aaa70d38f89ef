"""bench.device_wheels: the wheels carried to a GPU machine are pinned at the versions CI installs."""

from __future__ import annotations

import re

import pytest

from conftest import REPO


def test_carried_wheels_are_pinned_at_this_environments_versions():
    from bench.device_wheels import CARRY, pinned

    pins = dict(p.split("==") for p in pinned(CARRY))
    assert set(pins) == set(CARRY)
    ours = dict(re.findall(r'"([\w-]+)==([^"]+)"', (REPO / "pyproject.toml").read_text()))  # the project's pins
    for name in ("trl", "transformers", "tokenizers", "peft", "accelerate", "datasets"):
        assert pins[name] == ours[name], name  # the GPU runs what CI tests


def test_a_distribution_missing_here_stops_before_any_download():
    from bench.device_wheels import pinned

    with pytest.raises(SystemExit, match=r"not installed in this environment: no-such-dist-xyz"):
        pinned(["trl", "no-such-dist-xyz"])
