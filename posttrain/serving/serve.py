"""Serve the promoted model over an OpenAI-compatible HTTP API: transformers' own server (`transformers serve`).

    python -m posttrain.serving.serve                                                # models/export on 127.0.0.1:8000
    python -m posttrain.serving.serve --model models:/llm-lifecycle-student@candidate --port 8001
    python -m posttrain.serving.serve --model models/align --continuous-batching
    python -m posttrain.serving.serve --model models:/llm-lifecycle-student@candidate --save DIR  # the folder it serves
    python -m posttrain.serving.serve --check http://127.0.0.1:8000      # smoke-test a running server, exit 1 if bad

Endpoints (transformers 5.23's FastAPI app, run by uvicorn): POST /v1/chat/completions (streamed with
`"stream": true`, else one JSON answer), POST /v1/completions, GET /v1/models, GET /health. Any OpenAI client
works: base_url http://127.0.0.1:8000/v1, any api_key, `model` the id that /v1/models lists.

`--model` is a model folder (`models/export`, any stage's folder: an adapter chain or a switched-off stage is
merged into a temporary folder first) or an MLflow registry URI (`models:/<name>@<alias>`,
`models:/<name>/<version>`, read from params.yaml's `tracking.uri`, else $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db). The served model id is the folder as given (`models/export`), or `<name>-v<version>` for a
registry URI. The model's own chat template is applied and generation stops at its generation config's
eos token (the end-of-turn token for the lineage's ChatML models); requests set `max_tokens`, `temperature`,
`top_p`, `seed`, `stop`.

Four small changes to the stock server: it is pinned to the one model (requests naming another get 400),
/v1/models lists that model (upstream lists the Hugging Face cache, which never holds a local folder), a chat
request without a `messages` list gets 422 saying so (upstream answers 500), and 4xx bodies take OpenAI's error
shape, {"error": {"message": ...}}, so OpenAI clients show the reason (upstream sends FastAPI's {"detail": ...}). Calling transformers' Serve directly also skips the CLI's PyPI "new version available" check.
No network: HF_HUB_OFFLINE=1 unless set otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_MODEL = "models/export"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


class ServeError(SystemExit):
    """The model cannot be served; the message says why and what to do."""

    def __init__(self, msg: str):
        super().__init__(f"serve: {msg}")


def _tracking_uri() -> str:
    from posttrain.core.config import read_params
    from posttrain.core.tracking import tracking_uri

    configured = read_params().get("tracking", {}).get("uri", "") if Path("params.yaml").exists() else ""
    return tracking_uri(configured)


def from_registry(ref: str, work: Path) -> Path:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` downloaded into `work/<name>-v<version>/` as one
    Hugging Face folder (the transformers flavour keeps the weights under model/ and the tokenizer under
    components/tokenizer/)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(_tracking_uri())
    body = ref[len("models:/"):]
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, version = body.rsplit("/", 1)
            client.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise ServeError(f"{ref}: not in the registry at {mlflow.get_tracking_uri()} ({e}); run `dvc repro export` "
                         "or set tracking.uri / MLFLOW_TRACKING_URI") from None
    download = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                        dst_path=str(work / "mlflow")))
    weights, tokenizer = download / "model", download / "components" / "tokenizer"
    if not (weights / "config.json").exists():
        raise ServeError(f"{ref}: no model/config.json in the logged model (not a transformers-flavour model?)")
    out = work / f"{name}-v{version}"
    out.mkdir()
    for src in [*weights.iterdir(), *(tokenizer.iterdir() if tokenizer.is_dir() else [])]:
        (out / src.name).symlink_to(src.resolve())
    return out


def merged(folder: str, work: Path) -> Path:
    """An adapter folder (or a switched-off stage's) merged into one plain folder under `work`."""
    from posttrain.model.loading import load_model, load_tokenizer

    out = work / Path(folder).name
    load_model(folder).save_pretrained(out)
    load_tokenizer(folder).save_pretrained(out)
    return out


def resolve(ref: str, work: Path) -> tuple[str, Path | None]:
    """(model id to serve, folder to run the server from or None for here): the id is a path transformers loads."""
    from posttrain.model.loading import is_adapter_dir, is_passthrough

    if ref.startswith("models:/"):
        folder = from_registry(ref, work)
        return folder.name, folder.parent
    path = Path(ref)
    if not path.is_dir():
        raise ServeError(f"{ref}: no such model folder (`dvc repro export` writes models/export; or pass "
                         "--model models:/<name>@<alias>)")
    if is_adapter_dir(path) or is_passthrough(path):
        folder = merged(ref, work)
        return folder.name, folder.parent
    if not (path / "config.json").exists():
        raise ServeError(f"{ref}: no config.json: not a Hugging Face model folder")
    missing = [f for f in ("tokenizer_config.json",) if not (path / f).exists()]
    if missing:
        raise ServeError(f"{ref}: no tokenizer in the folder ({', '.join(missing)} missing)")
    return ref, None


def pin_model_list(model_id: str) -> None:
    """/v1/models answers the one served model (upstream scans the Hugging Face cache instead)."""
    from transformers.cli.serving import model_manager

    entry = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "llm-lifecycle"}
    model_manager.ModelManager.get_gen_models = staticmethod(lambda cache_dir=None: [entry])


def require_messages() -> None:
    """A chat request without a non-empty `messages` list gets 422 naming the field (upstream: KeyError, 500)."""
    from fastapi import HTTPException
    from transformers.cli.serving.chat_completion import ChatCompletionHandler

    upstream = ChatCompletionHandler._validate_request

    def validate(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m
                                                                     for m in messages):
            raise HTTPException(status_code=422, detail="`messages` must be a non-empty list of "
                                "{\"role\": ..., \"content\": ...} objects")
        upstream(self, body)

    ChatCompletionHandler._validate_request = validate


def openai_errors() -> None:
    """4xx answers in OpenAI's error shape, {"error": {"message", "type", ...}}, so OpenAI clients show the message
    (upstream answers FastAPI's {"detail": ...}, which they report as a bare "Error code: 400")."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from transformers.cli.serving import server

    upstream = server.build_server

    def error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status)

    def build_server(*args, **kwargs):
        app = upstream(*args, **kwargs)
        app.add_exception_handler(HTTPException, lambda _req, e: error(e.status_code, str(e.detail)))
        app.add_exception_handler(RequestValidationError, lambda _req, e: error(422, f"invalid request: {e.errors()}"))
        return app

    server.build_server = build_server


def check(url: str, timeout: float = 120.0) -> str:
    """Smoke-test a running server with the standard library only (the container's `make image` check): /health
    within `timeout`, one model in /v1/models, one chat completion answered. Returns the answer; raises ServeError."""
    import json
    import urllib.error
    import urllib.request

    def get(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    deadline = time.monotonic() + timeout
    while True:
        try:
            if get("/health").get("status") == "ok":
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"{url}/health did not answer ok within {timeout:.0f} s")
        time.sleep(1)
    models = [m["id"] for m in get("/v1/models")["data"]]
    if len(models) != 1:
        raise ServeError(f"{url}/v1/models lists {models}, not one model")
    try:
        answer = get("/v1/chat/completions", {"model": models[0], "max_tokens": 8, "temperature": 0,
                                              "messages": [{"role": "user", "content": "What is 2 plus 3?"}]})
    except urllib.error.HTTPError as e:
        raise ServeError(f"{url}/v1/chat/completions answered {e.code}: {e.read()[:300]!r}") from None
    text = answer["choices"][0]["message"]["content"]
    print(f"serve: {url} ok: model {models[0]}, answer {text!r} ({answer['usage']['completion_tokens']} tokens)")
    return text


def save(ref: str, out: Path) -> Path:
    """The folder `ref` resolves to, copied to `out` as plain files (what the container image bakes in)."""
    work = Path(tempfile.mkdtemp(prefix="posttrain-serve-"))
    try:
        model_id, run_dir = resolve(ref, work)
        shutil.copytree((run_dir / model_id) if run_dir else Path(model_id), out, symlinks=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"serve: {ref} saved to {out}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m posttrain.serving.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model folder or models:/<name>@<alias> (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto (the weights' dtype), float32, bfloat16, ...")
    p.add_argument("--continuous-batching", action="store_true",
                   help="batch concurrent requests (paged attention) instead of one generate() at a time")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's, one per core); 1 is fastest for tiny models on busy cores")
    p.add_argument("--log-level", default="error", help="transformers' log level (default error: no line per request)")
    p.add_argument("--save", metavar="DIR", help="write the resolved model folder to DIR (new) and exit")
    p.add_argument("--check", metavar="URL", help="smoke-test the server at URL instead of serving; exit 1 if it fails")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check:
        check(args.check)
        return
    if args.save:
        save(args.model, Path(args.save))
        return
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ServeError('the server needs the serving extra: .venv/bin/pip install -e ".[serve]"')
    work = Path(tempfile.mkdtemp(prefix="posttrain-serve-"))
    try:
        model_id, run_dir = resolve(args.model, work)
        if run_dir is not None:
            os.chdir(run_dir)  # the id stays a short relative folder name
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        pin_model_list(model_id)
        require_messages()
        openai_errors()
        from transformers.cli.serve import Serve

        print(f"serve: {model_id} (from {args.model}) at http://{args.host}:{args.port}/v1", flush=True)
        Serve(force_model=model_id, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
              continuous_batching=args.continuous_batching, log_level=args.log_level)
    except KeyboardInterrupt:  # Ctrl+C: uvicorn has shut down already
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
