"""params.yaml -> typed config: unknown, missing and ill-typed keys fail at load, naming stage and key."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from posttrain.core.config import ConfigError, TrainConfig, build, load_config, read_params, stage_section
from stages.cpt import CPTConfig
from stages.sft import SFTStageConfig

REPO = Path(__file__).resolve().parent.parent
REPO_PARAMS = read_params(REPO / "params.yaml")
DVC_STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def test_repo_params_load_for_every_stage():
    from stages.base import BaseConfig
    from stages.evaluate import EvaluateConfig
    from stages.sample import SampleConfig

    for stage, cls in [("sample", SampleConfig), ("base", BaseConfig), ("cpt", CPTConfig),
                       ("sft", SFTStageConfig), ("evaluate", EvaluateConfig)]:
        cfg = load_config(stage, cls, params=REPO_PARAMS)
        assert cfg.seed == REPO_PARAMS["seed"]


def _params_with(stage, mutate):
    params = yaml.safe_load(yaml.safe_dump(REPO_PARAMS))
    mutate(params[stage])
    return params


def test_unknown_key_is_named_with_its_stage():
    params = _params_with("sft", lambda s: s["train"].update(learning_rte=0.1))
    with pytest.raises(ConfigError, match=r"\[sft.train\] unknown key\(s\): learning_rte"):
        load_config("sft", SFTStageConfig, params=params)


def test_missing_key_is_named_with_its_stage():
    params = _params_with("cpt", lambda s: s.pop("eval_file"))
    with pytest.raises(ConfigError, match=r"\[cpt\] missing key\(s\): eval_file"):
        load_config("cpt", CPTConfig, params=params)


def test_wrong_type_and_bad_choice_are_rejected():
    params = _params_with("sft", lambda s: s["train"].update(max_steps="many"))
    with pytest.raises(ConfigError, match=r"\[sft.train.max_steps\] expected int, got 'many'"):
        load_config("sft", SFTStageConfig, params=params)
    params = _params_with("sft", lambda s: s["adapter"].update(method="lorax"))
    with pytest.raises(ConfigError, match=r"\[sft.adapter.method\] must be one of"):
        load_config("sft", SFTStageConfig, params=params)


def test_int_is_accepted_for_float_but_bool_is_not_int():
    train = dict(stage_section(REPO_PARAMS, "sft")["train"], learning_rate=1)
    assert build(TrainConfig, train, "t").learning_rate == 1.0
    with pytest.raises(ConfigError, match="expected int"):
        build(TrainConfig, dict(train, max_steps=True), "t")


def test_a_field_with_a_default_may_be_omitted_and_others_may_not():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Source:
        path: str
        columns: dict[str, str] = field(default_factory=dict)
        limit: int = 3

    assert build(Source, {"path": "a.jsonl"}, "s") == Source("a.jsonl", {}, 3)
    written = {"path": "a", "columns": {"q": "question"}, "limit": 5}
    assert build(Source, written, "s") == Source("a", {"q": "question"}, 5)
    with pytest.raises(ConfigError, match=r"\[s.limit\] expected int"):
        build(Source, {"path": "a", "limit": "5"}, "s")  # a written value is checked as strictly as ever
    with pytest.raises(ConfigError, match=r"\[s\] missing key\(s\): path"):
        build(Source, {"columns": {}}, "s")


def test_missing_section_and_top_level_key():
    params = dict(REPO_PARAMS)
    params.pop("sft")
    with pytest.raises(ConfigError, match=r"\[sft\] section missing"):
        load_config("sft", SFTStageConfig, params=params)
    params = dict(REPO_PARAMS)
    params.pop("seed")
    with pytest.raises(ConfigError, match=r"\[cpt\] missing top-level key 'seed'"):
        load_config("cpt", CPTConfig, params=params)


def test_cli_exits_nonzero_with_the_message(tmp_path):
    params = _params_with("cpt", lambda s: s.update(bogus=1))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.cpt", "--params", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "config error: [cpt] unknown key(s): bogus" in proc.stderr


def test_half_precision_without_the_hardware_stops_with_a_clear_message():
    import torch

    from posttrain.core.runtime import cpu_has_bf16, resolve_precision

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RuntimeError, match="precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16")
    if not cpu_has_bf16():
        with pytest.raises(RuntimeError, match="precision=bf16 needs a CUDA GPU or a CPU with native bf16"):
            resolve_precision("bf16")
    assert resolve_precision("fp32") == "fp32"


def test_a_profile_is_laid_over_params_key_by_key(tmp_path):
    from posttrain.core.config import read_params

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "small.yaml").write_text("sft: {train: {max_steps: 3}, adapter: {method: lora}}\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "profile": "small"}))
    cfg = load_config("sft", SFTStageConfig, tmp_path / "params.yaml")
    assert cfg.train.max_steps == 3 and cfg.adapter.method == "lora"
    assert cfg.train.learning_rate == params["sft"]["train"]["learning_rate"]  # the rest of the section stays
    assert cfg.adapter.lora_r == params["defaults"]["adapter"]["lora_r"]  # shared blocks still fill in
    assert read_params(tmp_path / "params.yaml")["cpt"] == params["cpt"]


def test_an_unknown_profile_or_one_that_sets_profile_is_refused(tmp_path):
    from posttrain.core.config import read_params

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "default.yaml").write_text("{}\n")
    (tmp_path / "profiles" / "loop.yaml").write_text("profile: default\n")
    (tmp_path / "params.yaml").write_text("profile: nosuch\n")
    with pytest.raises(ConfigError, match=r"\[profile\] 'nosuch': no file .*nosuch.yaml \(profiles: default, loop\)"):
        read_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("profile: loop\n")
    with pytest.raises(ConfigError, match="a profile cannot set 'profile'"):
        read_params(tmp_path / "params.yaml")


def test_the_real_profile_builds_every_stage_config():
    import importlib

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["profile"] == "default"
    from posttrain.core.config import overlaid

    real = overlaid(params, yaml.safe_load((REPO / "profiles" / "real.yaml").read_text()))
    for stage in DVC_STAGES:
        module = importlib.import_module(f"stages.{stage}")
        cfg = load_config(stage, typing.get_type_hints(module.run)["cfg"], params=real)
        if hasattr(cfg, "adapter"):
            # a pretrained model: adapters, or (reward, judge) the top layers only, never full training
            top_layers_only = cfg.adapter.method == "freeze" and stage in ("reward", "judge")
            assert cfg.adapter.method == "lora" or top_layers_only, stage
    assert real["base"]["source"].endswith(".gguf")
