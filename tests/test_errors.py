"""Nothing a user writes ends in a traceback (issue 33).

A corpus of bad and unusual input across config (params.yaml, a profile), model sources (base.source) and data
files. Every bad one ends the stage's CLI with one line `<label>: <message>` naming the key or the file (and row),
exit status 1 (SystemExit with a message), no traceback and nothing written; every valid-but-unusual one is read
correctly. The CLIs run in-process (runpy, as `python -m stages.<name>` would); two real subprocesses prove the
exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params
from posttrain.core.config import ConfigError, StageError, TrainConfig, build, read_params
from posttrain.core.files import MissingInput, check_model_folder, digest, read_jsonl
from posttrain.data.readers import DataError, read_source, read_sources

LATIN1 = '{"text": "caf\xe9 cr\xe8me"}\n'.encode("latin-1")
BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def stage_error(stage: str, tmp_path: Path, monkeypatch, capsys, params: dict | None = None,
                params_text: str | bytes | None = None, params_path: Path | None = None) -> str:
    """Run `python -m stages.<stage> --params FILE` in-process from tmp_path; its one-line error message.

    Asserts what every case shares: a SystemExit carrying a message (Python prints it to stderr and exits 1),
    no traceback printed, and nothing written (tmp_path holds the same files before and after)."""
    monkeypatch.chdir(tmp_path)
    if params_path is None:
        params_path = tmp_path / "params.yaml"
        if params_text is None:
            params_text = yaml.dump(params if params is not None else TINY, Dumper=DUMPER, sort_keys=False)
        if isinstance(params_text, str):
            params_text = params_text.encode()
        params_path.write_bytes(params_text)
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"stages.{stage}", "--params", str(params_path)])
    with pytest.raises(SystemExit) as exit_, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module may be imported already
        runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    message = exit_.value.code
    assert isinstance(message, str), f"exit code {message!r}, expected a message (exit status 1)"
    assert "Traceback" not in out.out + out.err + message
    assert snapshot(tmp_path) == before, "the stage wrote something"
    return message


TINY = tiny_params()  # parsed once: every case starts from a copy
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def params_copy() -> dict:
    return copy.deepcopy(TINY)


def with_params(mutate) -> dict:
    params = params_copy()
    mutate(params)
    return params


def prepare_params(tmp_path: Path, *sources: dict, **prepare) -> dict:
    """params with prepare reading `sources` (plus a good instruction file, so the mixture has a source)."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    params = params_copy()
    params["prepare"].update(sources=[{"path": str(good), "kind": "instruction"}, *sources],
                             mixture={"size": 4, "ratios": {"instruction": 1.0}}, **prepare)
    return params


def one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- config: params.yaml and profiles

PARAMS = (REPO / "params.yaml").read_text()


def test_malformed_yaml_names_file_and_line(tmp_path, monkeypatch, capsys):
    text = PARAMS.replace("seed: 42", "seed: [42", 1)
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_text=text))
    assert msg.startswith(f"config error: {tmp_path / 'params.yaml'} line ")
    assert "malformed YAML" in msg and "fix the params file" in msg


def test_yaml_tab_indentation(tmp_path, monkeypatch, capsys):
    text = PARAMS.replace("\n  out_dir: models/base", "\n\tout_dir: models/base", 1)
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_text=text))
    assert "params.yaml line" in msg and "malformed YAML" in msg


def test_params_that_are_not_a_mapping(tmp_path, monkeypatch, capsys):
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_text="- a\n- b\n"))
    assert msg == f"config error: {tmp_path / 'params.yaml'}: expected a mapping of keys at the top level, got list"


def test_params_path_is_a_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf").mkdir()
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_path=tmp_path / "conf"))
    assert msg == f"config error: {tmp_path / 'conf'}: is a folder, expected the params file (a YAML file)"


def test_params_not_utf8_names_the_line(tmp_path, monkeypatch, capsys):
    text = PARAMS.encode().replace(b"seed: 42", b"seed: 42  # caf\xe9", 1)
    line = text[: text.index(b"\xe9")].count(b"\n") + 1
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_text=text))
    assert msg == (f"config error: {tmp_path / 'params.yaml'} line {line}: not UTF-8 text (byte 0xe9); "
                   f"save the params file as UTF-8")


def test_params_with_bom_and_crlf_read_as_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(BOM + PARAMS.replace("\n", "\r\n").encode())
    assert read_params(path) == yaml.safe_load(PARAMS)


def test_malformed_profile_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "real.yaml").write_text("sft:\n  train: {max_steps: 3\n")
    text = PARAMS.replace("profile: default", "profile: real", 1)
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_text=text))
    assert msg.startswith(f"config error: {tmp_path / 'profiles' / 'real.yaml'} line ")
    assert "fix the profile" in msg


def test_unknown_profile(tmp_path, monkeypatch, capsys):
    text = PARAMS.replace("profile: default", "profile: huge", 1)
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params_text=text))
    assert msg.startswith("config error: [profile] 'huge': no file ")


def test_defaults_that_are_not_a_mapping(tmp_path, monkeypatch, capsys):
    msg = stage_error("base", tmp_path, monkeypatch, capsys, params=with_params(lambda p: p.update(defaults=[1])))
    assert one_line(msg).startswith("config error: [defaults] expected a mapping of blocks")


RANGES = [  # (stage, section path, key, bad value, rule)
    ("sft", ("sft", "train"), "learning_rate", -1e-3, "> 0"),
    ("sft", ("sft", "train"), "max_steps", 0, "at least 1"),
    ("cpt", ("cpt", "train"), "batch_size", 0, "at least 1"),
    ("cpt", ("cpt", "train"), "max_length", -5, "at least 1"),
    ("cpt", ("defaults", "train"), "weight_decay", -0.1, ">= 0"),
    ("sft", ("defaults", "adapter"), "lora_dropout", 2.0, "in [0, 1]"),
    ("rft", ("rft",), "temperature", 0.0, "> 0"),
    ("base", ("base", "tiny"), "num_layers", 0, "at least 1"),
    ("sample", ("sample",), "n_corpus_docs", -1, ">= 0"),
]


@pytest.mark.parametrize("stage, section, key, value, rule", RANGES, ids=[f"{r[1][-1]}.{r[2]}" for r in RANGES])
def test_values_out_of_range_name_the_key(tmp_path, monkeypatch, capsys, stage, section, key, value, rule):
    def mutate(p):
        block = p
        for name in section:
            block = block.setdefault(name, {})
        block[key] = value
    msg = one_line(stage_error(stage, tmp_path, monkeypatch, capsys, params=with_params(mutate)))
    where = ".".join((stage, *section[1:], key))  # a defaults block is reported as the stage's own
    assert msg == f"config error: [{where}] must be {rule}, got {value}; fix it in params.yaml (or the profile)"


def test_a_share_above_one_is_named(tmp_path, monkeypatch, capsys):
    params = with_params(lambda p: p["prepare"].update(judge_share=1.5))
    msg = one_line(stage_error("prepare", tmp_path, monkeypatch, capsys, params=params))
    assert msg.startswith("config error: [prepare.judge_share] must be in [0, 1]")


def test_not_a_number_and_not_finite(tmp_path, monkeypatch, capsys):
    train = dict(TINY["defaults"]["train"], max_steps=5, learning_rate=1e-3, batch_size=2, max_length=8,
                 logging_steps=1, save_steps=5)
    with pytest.raises(ConfigError, match=r"^\[sft.train.learning_rate\] must be a finite number, got nan"):
        build(TrainConfig, dict(train, learning_rate=float("nan")), "sft.train")
    with pytest.raises(ConfigError, match=r"^\[sft.train.learning_rate\] expected float, got 'fast' \(str\)"):
        build(TrainConfig, dict(train, learning_rate="fast"), "sft.train")
    # `1e-3` is a float in YAML 1.2 but a string to PyYAML: read as the number it is
    assert build(TrainConfig, dict(train, learning_rate=yaml.safe_load("x: 1e-3")["x"]), "sft.train").learning_rate == 1e-3


# ---------------------------------------------------------------- model sources (base.source)


def base_with(source: str) -> dict:
    return with_params(lambda p: p["base"].update(source=source))


def model_folder(root: Path, config=True, weights=b"ok", tokenizer=True) -> Path:
    from safetensors.numpy import save_file
    import numpy as np

    folder = root / "model"
    folder.mkdir()
    if config:
        (folder / "config.json").write_text('{"model_type": "llama"}')
    if weights == b"ok":
        save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    elif weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


SOURCE_CASES = {
    "missing folder": (lambda t: "./no/such/model", "[base.source] ./no/such/model: no such folder; expected `tiny`"),
    "hub id not cached": (lambda t: "someone/not-cached", "[base.source] someone/not-cached: no such folder, and no "
                          "Hugging Face model of that id in the local cache"),
    "a plain file": (lambda t: (t / "model.txt").write_text("x") and "model.txt", "[base.source] model.txt: a file;"),
    "folder with only config.json": (lambda t: model_folder(t, weights=None, tokenizer=False).name,
                                     "[base.source] model: no *.safetensors weights;"),
    "folder without tokenizer": (lambda t: model_folder(t, tokenizer=False).name, "[base.source] model: no tokenizer"),
    "folder without config": (lambda t: model_folder(t, config=False).name, "[base.source] model: no config.json"),
    "pickle weights only": (lambda t: (model_folder(t, weights=None) / "pytorch_model.bin").write_bytes(b"x") and "model",
                            "[base.source] model: only pytorch_model.bin: this pipeline loads safetensors only"),
    "corrupt safetensors": (lambda t: model_folder(t, weights=b"\x00" * 3 + b"garbage").name,
                            "model/model.safetensors: truncated or corrupt safetensors file"),
    "missing gguf": (lambda t: "nope.gguf", "[base.source] nope.gguf: no such GGUF file;"),
    "package gguf not installed": (lambda t: "pkg:no_such_pkg/x.gguf",
                                   "[base.source] 'pkg:no_such_pkg/x.gguf': package 'no_such_pkg' is not installed"),
}


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_bad_model_source_is_named(tmp_path, monkeypatch, capsys, case):
    make, expected = SOURCE_CASES[case]
    source = make(tmp_path)
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params=base_with(source)))
    assert msg.startswith("config error: ") and expected in msg, msg


def test_truncated_safetensors(tmp_path, monkeypatch, capsys):
    folder = model_folder(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params=base_with("model")))
    assert msg.startswith("config error: [base.source] model/model.safetensors: truncated safetensors file "
                          "(tensors need 64 bytes of data, it has 54)")


def test_sharded_index_naming_a_missing_shard(tmp_path):
    folder = model_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00002.safetensors"}}))
    with pytest.raises(ConfigError, match=r"names shard\(s\) that are missing: model-00002.safetensors"):
        check_model_folder(folder, "base.source")


def gguf_file(path: Path) -> bytes:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("cut", ["tensor data", "header"])
def test_truncated_gguf(tmp_path, monkeypatch, capsys, cut):
    path = tmp_path / "m.gguf"
    data = gguf_file(path)
    path.write_bytes(data[:-40] if cut == "tensor data" else data[:60])
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params=base_with("m.gguf")))
    assert msg.startswith("config error: [base.source] m.gguf: truncated or corrupt GGUF file (")
    assert msg.endswith("); re-download it")


def test_a_gguf_that_is_not_gguf(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(b"<html>404</html>")
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys, params=base_with("m.gguf")))
    assert msg.startswith("config error: [base.source] m.gguf: not a GGUF file (it starts with b'<htm', not b'GGUF')")


# ---------------------------------------------------------------- a stage run before its inputs exist


def test_base_before_prepare_names_the_stage(tmp_path, monkeypatch, capsys):
    msg = one_line(stage_error("base", tmp_path, monkeypatch, capsys))
    assert msg == ("missing input: [base.tokenizer.train_files] data/processed/corpus_train.jsonl does not exist: "
                   "run `python -m stages.prepare` (or `dvc repro prepare`) to make it")


def test_missing_and_unreadable_stage_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInput, match=r"^models/cpt does not exist: run `python -m stages.cpt`"):
        digest("models/cpt")
    (tmp_path / "models" / "cpt").mkdir(parents=True)
    with pytest.raises(MissingInput, match=r"^models/cpt is an empty folder: run `python -m stages.cpt`"):
        digest("models/cpt")
    with pytest.raises(FileNotFoundError):  # still one, for code that expects it
        read_jsonl("data/processed/eval_cot.jsonl")
    (tmp_path / "data" / "processed").mkdir(parents=True)
    bad = tmp_path / "data" / "processed" / "eval_cot.jsonl"
    bad.write_text('{"prompt": 1}\n{"prompt": \n')
    with pytest.raises(StageError, match=r"eval_cot.jsonl line 2: malformed JSON .* run `python -m "
                                                   r"stages.prepare`"):
        read_jsonl(bad)
    with pytest.raises(StageError, match=r"is a folder, expected a .jsonl file"):
        read_jsonl(tmp_path / "data")


def test_stage_before_its_inputs_end_to_end(tmp_path):
    """A real process: exit status 1, one line naming the input and the stage that makes it, no traceback.
    (`python -m stages.sft` before models/cpt ends the same way, through digest(), tested above: its process
    imports torch and TRL first, ~30 s here.)"""
    (tmp_path / "params.yaml").write_text(yaml.dump(TINY, Dumper=DUMPER, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "stages.base"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("missing input: [base.tokenizer.train_files] data/processed/corpus_train.jsonl "
                                   "does not exist: run `python -m stages.prepare` (or `dvc repro prepare`) to make it")
    assert snapshot(tmp_path) == {"params.yaml"}


def test_malformed_yaml_end_to_end(tmp_path):
    (tmp_path / "params.yaml").write_text("base: {source: tiny\n")
    proc = subprocess.run([sys.executable, "-m", "stages.base"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("config error: params.yaml line 2 column 1: malformed YAML")
    assert snapshot(tmp_path) == {"params.yaml"}


# ---------------------------------------------------------------- data files through prepare


def data_error(tmp_path, monkeypatch, capsys, source: dict, **prepare) -> str:
    return stage_error("prepare", tmp_path, monkeypatch, capsys, params=prepare_params(tmp_path, source, **prepare))


def test_latin1_jsonl_names_file_and_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"text": "plain"}\n' + LATIN1)
    msg = one_line(data_error(tmp_path, monkeypatch, capsys, {"path": str(path), "kind": "corpus"}))
    assert msg == (f"data error: {path} line 2: not utf-8 text (byte 0xe9 at byte column 14); set this source's "
                   f"`encoding:` in prepare.sources (e.g. encoding: latin-1) or save the file as UTF-8")


DATA_CASES = {  # name -> (file name, bytes, expected message after the path)
    "corrupt gzip": ("c.jsonl.gz", b"\x1f\x8b\x08\x00garbage", ": unreadable gzip file ("),
    "truncated gzip": ("c.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 50)[:-12], ": unreadable gzip file ("),
    "not gzip at all": ("c.csv.gz", b"text\nhello\n", ": unreadable gzip file ("),
    "malformed JSON line": ("c.jsonl", b'{"text": "a"}\n{"text": "b",}\n', " line 2: malformed JSON ("),
    "malformed JSON file": ("c.json", b'[{"text": "a"}, {"text": ]', ": malformed JSON (Expecting value at line 1"),
    "corrupt parquet": ("c.parquet", b"PAR1 not really", ": unreadable Parquet ("),
    "unclosed CSV quote": ("c.csv", b'text\n"hello\nworld\n', ": unreadable CSV ("),
    "empty file": ("c.jsonl", b"", ": no rows"),
    "unknown type": ("c.txt", b"hello\n", ": unknown file type '.txt'"),
    "JSON scalar line": ("c.jsonl", b'{"text": "a"}\n42\n', " line 2: expected a JSON object, got int"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file_is_named(tmp_path, monkeypatch, capsys, case):
    name, data, expected = DATA_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    msg = one_line(data_error(tmp_path, monkeypatch, capsys, {"path": str(path), "kind": "corpus"}))
    assert msg.startswith(f"data error: {path}{expected}"), msg


def test_source_that_is_a_folder_or_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "raw").mkdir()
    msg = one_line(data_error(tmp_path, monkeypatch, capsys, {"path": str(tmp_path / "raw"), "kind": "corpus"}))
    assert msg == f"data error: {tmp_path / 'raw'}: is a folder, not a data file; name one file per source in prepare.sources"
    with pytest.raises(DataError, match=r"nope.csv: no such file"):
        read_source(tmp_path / "nope.csv", "cot")


def test_row_longer_than_the_limit_names_it(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 50}) + "\n")
    with pytest.raises(DataError) as e:
        read_source(path, "corpus", max_chars=20)
    assert str(e.value) == (f"{path} line 2, column 'text': check 'max_chars' failed (50 chars, more than the limit "
                            f"of 20 (prepare.max_chars in params.yaml): shorten the row, raise the limit, or set "
                            f"on_bad_rows: drop to leave such rows out)")
    table = read_source(path, "corpus", on_bad_rows="drop", max_bad_share=0.5, max_chars=20)
    assert [r["text"] for r in table.rows] == ["short"]
    assert "more than the limit of 20" in table.rejects[0].to_json()["problems"][0]["error"]
    assert len(read_source(path, "corpus", max_chars=50).rows) == 2  # at the limit: kept


def test_a_long_message_in_a_chat_names_the_limit(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "y" * 30}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1, column 'messages': check 'messages_max_chars' failed \(30 chars, "
                                        r"more than the limit of 10 \(prepare.max_chars"):
        read_source(path, "instruction", max_chars=10)


# ---------------------------------------------------------------- valid but unusual files are read as written


def rows_of(path: Path, kind: str, **kw) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_source(path, kind, **kw).rows]


def test_utf8_with_a_byte_order_mark(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(BOM + b'{"text": "caf\xc3\xa9"}\n{"text": "b"}\n')
    assert rows_of(jsonl, "corpus") == [{"text": "café"}, {"text": "b"}]
    array = tmp_path / "bom.json"
    array.write_bytes(BOM + b'[{"text": "a"}]')
    assert rows_of(array, "corpus") == [{"text": "a"}]
    csv = tmp_path / "bom.csv"
    csv.write_bytes(BOM + b"question,rationale,answer\nq,r,7\n")
    assert rows_of(csv, "cot") == [{"question": "q", "rationale": "r", "answer": "7"}]
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(BOM + b'{"text": "z"}\n'))
    assert rows_of(gz, "corpus") == [{"text": "z"}]


def test_crlf_line_endings_keep_line_numbers(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    table = read_source(path, "corpus")
    assert [(r["text"], r["_row"]) for r in table.rows] == [("a", 1), ("b", 3)]


def test_csv_with_quoted_multiline_fields_and_crlf(tmp_path):
    path = tmp_path / "cot.csv"
    path.write_bytes(b'question,rationale,answer\r\n"two\r\nlines","a ""quoted"", comma",5\r\nq2,r2,6\r\n')
    assert rows_of(path, "cot") == [{"question": "two\nlines", "rationale": 'a "quoted", comma', "answer": "5"},
                                    {"question": "q2", "rationale": "r2", "answer": "6"}]


def test_json_with_unicode_escapes(tmp_path):
    path = tmp_path / "u.json"
    path.write_text('[{"text": "caf\\u00e9 \\ud83d\\ude00 \\u2028 end"}]')
    assert rows_of(path, "corpus") == [{"text": "café \U0001F600 \u2028 end"}]


def test_an_encoding_setting_reads_latin1(tmp_path):
    path = tmp_path / "l1.jsonl"
    path.write_bytes(LATIN1)
    assert rows_of(path, "corpus", encoding="latin-1") == [{"text": "café crème"}]
    tables = read_sources([(path, "corpus", {}, "latin-1")])  # prepare's (path, kind, columns, encoding)
    assert tables[0].rows[0]["text"] == "café crème"
    with pytest.raises(DataError, match=r"l1.jsonl: unknown encoding 'klingon'; set this source's `encoding:`"):
        read_source(path, "corpus", encoding="klingon")
