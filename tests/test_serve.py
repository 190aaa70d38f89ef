"""posttrain.serving.serve: the real OpenAI-compatible server (transformers serve) on a tiny model, spoken to with the
official openai client: a chat completion, a streamed one, the model list, the end-of-turn stop and bad requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("openai", reason='the openai client: pip install -e ".[test]"')
from transformers.utils.import_utils import is_serve_available  # noqa: E402

from conftest import REPO  # noqa: E402

pytestmark = pytest.mark.skipif(not is_serve_available(), reason='transformers[serving]: pip install -e ".[serve]"')

MESSAGES = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny export folder served by `python -m posttrain.serving.serve` on a free loopback port."""
    import httpx

    from bench.load import build_tiny_export, free_port

    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_export(root / "export")
    port = free_port()
    log = open(root / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.serving.serve", "--model", str(model),
                             "--port", str(port), "--threads", "1"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited: {(root / 'serve.log').read_text()[-2000:]}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
            time.sleep(0.3)
        yield {"base": base, "model": str(model), "log": root / "serve.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(server):
    """The same model and tokenizer in this process, to check the server's answers against."""
    from posttrain.model.loading import load_model, load_tokenizer

    return load_model(server["model"]).eval(), load_tokenizer(server["model"])


def greedy(local, max_new_tokens: int) -> tuple[list[int], list[int]]:
    import torch

    model, tok = local
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return enc["input_ids"][0].tolist(), out[0, enc["input_ids"].shape[1]:].tolist()


def test_model_list_names_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [server["model"]]


def test_chat_completion_uses_the_models_template_and_weights(client, server, local):
    r = client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=8, temperature=0)
    prompt_ids, answer_ids = greedy(local, 8)
    assert r.usage.prompt_tokens == len(prompt_ids)  # the ChatML template, rendered by the server
    assert r.usage.completion_tokens == len(answer_ids) == 8 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == local[1].decode(answer_ids, skip_special_tokens=True)


def test_streamed_chat_completion_equals_the_plain_one(client, server):
    plain = client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8


def test_generation_stops_at_the_end_of_turn_token(client, server, local):
    tok = local[1]
    assert tok.eos_token == "<|im_end|>" and local[0].generation_config.eos_token_id == tok.eos_token_id
    bias = {str(tok.eos_token_id): 100.0}  # the end-of-turn token first: the answer must end there, not at max_tokens
    r = client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=8, logit_bias=bias)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].message.content == ""  # the end-of-turn token is not part of the answer
    chunks = list(client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=8,
                                                 logit_bias=bias, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_bad_requests_get_a_4xx_that_says_why(client, server):
    import httpx
    import openai

    with pytest.raises(openai.BadRequestError, match="pinned to") as e:  # 400: another model's name
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 400
    with pytest.raises(openai.UnprocessableEntityError, match="Unexpected fields"):  # 422: a field it does not know
        client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=4,
                                       extra_body={"beam_width": 3})
    r = httpx.post(f"{server['base']}/v1/chat/completions", json={"model": server["model"], "max_tokens": 4})
    assert r.status_code == 422 and "`messages` must be" in r.json()["error"]["message"]
    assert httpx.get(f"{server['base']}/health").json() == {"status": "ok"}  # and it still serves


def test_a_missing_model_folder_stops_with_a_message(tmp_path):
    from posttrain.serving.serve import main

    with pytest.raises(SystemExit, match="no such model folder"):
        main(["--model", str(tmp_path / "nothing")])


def _pins(requirements) -> dict[str, str]:
    import re

    out = {}
    for req in requirements:
        m = re.match(r'"?([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s";\\]+)', req.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_the_image_installs_what_pyproject_pins():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"] + project["optional-dependencies"]["serve"])
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    image = _pins(word for line in lines if line.startswith("RUN pip") for word in line.split())
    assert image, "no pinned pip install in the Dockerfile"
    assert {k: v for k, v in image.items() if k in pinned} == {k: pinned[k] for k in image if k in pinned}
    assert set(_pins(project["optional-dependencies"]["serve"])) <= set(image)


def test_the_dockerfile_lints_clean_and_runs_the_serve_command_as_non_root():
    import shutil

    text = (REPO / "Dockerfile").read_text()
    assert '"-m", "posttrain.serving.serve"' in text and "\nUSER 10001" in text
    hadolint = shutil.which("hadolint", path=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip('hadolint: pip install -e ".[test]" (Linux x86-64)')
    r = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
