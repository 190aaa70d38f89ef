"""Load on the two HTTP servers of one model: N concurrent clients for T seconds, same prompts, side by side.

    .venv/bin/python -m bench.load                                   # a tiny model built here, 1/4/16 clients, 20 s each
    .venv/bin/python -m bench.load --model models/export --clients 16 --seconds 30 --max-tokens 32
    .venv/bin/python -m bench.load --url http://127.0.0.1:8000 --only openai   # a server already running

Servers, each started here on a free 127.0.0.1 port from the same model folder, one at a time:
  openai   python -m posttrain.serving.serve (transformers serve): POST /v1/chat/completions, not streamed
  openai+cb the same with --continuous-batching (concurrent requests batched, paged KV cache)
  mlflow   mlflow models serve --env-manager local on the model logged as export logs it (posttrain.export.registry):
           POST /invocations {"inputs": [prompt], "params": {"max_new_tokens": n}}
Each server gets one unmeasured request first (the first generate() and the paged cache's set-up are slow).
Every request asks for at most --max-tokens new tokens of the model's chat answer to one prompt (round-robin over
the prompts) at temperature 0. Each client sends its next request when its last one is answered; requests still in
flight at T are awaited and counted. The client loop is bounded by --seconds and --max-requests per client.

Printed per server and client count: requests/s, p50/p95/p99 latency (s), generated tokens/s, errors (non-2xx,
timeouts, broken connections) and the first error. Tokens: the server's usage.completion_tokens for openai;
/invocations returns text only (re-tokenizing it miscounts), so an answered prompt counts its greedy answer's length,
measured once here with model.generate (the greedy answer is the same whichever server gives it).
Only loopback addresses are used; nothing here touches the network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Count the words.\n\nblue fox gold",
    "What is 2 plus 3?",
    "Name a colour of the sea.",
    "Reverse the words: red green blue",
    "Say hello to the team.",
    "What is the capital of France?",
    "Give one word that rhymes with cat.",
    "Sort these numbers: 3 1 2",
]
REGISTERED = "load-bench"


def build_tiny_export(out_dir: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Llama with the lineage's BPE tokenizer and ChatML template, saved like models/export (random
    weights: its answers are noise, its shapes and template are the real thing's)."""
    import torch

    from posttrain.model.tiny import TinyModelConfig, TokenizerConfig, build_tiny_model, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = out / "tokenizer-text.jsonl"
    words = "the quick brown fox jumps over a lazy dog count words sum of two and three is five red green blue"
    texts.write_text("".join(json.dumps({"text": f"{p} {words} {i}"}) + "\n" for i, p in enumerate(PROMPTS * 4)))
    tokenizer = train_tokenizer(TokenizerConfig(vocab_size=320, train_files=[str(texts)]))
    texts.unlink()
    torch.manual_seed(seed)
    cfg = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=2,
                          intermediate_size=2 * hidden, max_position_embeddings=512, tie_word_embeddings=False)
    build_tiny_model(cfg, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn's graceful stop) to the server's process group, then SIGKILL after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_openai(model: str, port: int, log, cb: bool = False, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "posttrain.serving.serve", "--model", model, "--port", str(port)]
    return subprocess.Popen(cmd + (["--continuous-batching"] if cb else []), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)


def register_for_mlflow(model: str, store: Path, max_new_tokens: int) -> str:
    """The folder logged and registered the way export does (posttrain.export.registry), in a store of its own."""
    import mlflow

    from posttrain.export.registry import register
    from posttrain.model.loading import load_model, load_tokenizer

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("load-bench")
    with mlflow.start_run():
        version = register(REGISTERED, "bench", load_model(model), load_tokenizer(model), None, {}, max_new_tokens)
    return f"models:/{REGISTERED}/{version}"


def start_mlflow(uri: str, store: Path, port: int, log, env: dict | None = None) -> subprocess.Popen:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(env or os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    return subprocess.Popen(cmd, cwd=store, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def request_for(kind: str, model_id: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    if kind == "mlflow":
        return "/invocations", {"inputs": [prompt], "params": {"max_new_tokens": max_tokens}}
    return "/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": prompt}],
                                    "max_tokens": max_tokens, "temperature": 0}


async def run_load(base: str, kind: str, model_id: str, clients: int, seconds: float, max_tokens: int,
                   max_requests: int, count_tokens, warmup: bool = False) -> dict:
    """`clients` closed-loop clients for `seconds`; latencies, tokens and errors."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(300.0), limits=limits) as http:
        start = time.perf_counter()
        end = start + seconds

        async def client(i: int) -> None:
            nonlocal tokens
            for n in range(max_requests):
                if time.perf_counter() >= end and not warmup:
                    return
                prompt = PROMPTS[(i + n * clients) % len(PROMPTS)]
                path, body = request_for(kind, model_id, prompt, max_tokens)
                t0 = time.perf_counter()
                try:
                    r = await http.post(path, json=body)
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens += count_tokens(r.json(), prompt)

        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 else latencies * 99
    return {"server": kind, "clients": clients, "requests": len(latencies), "wall_s": wall,
            "req_per_s": len(latencies) / wall, "p50_s": q[49] if q else float("nan"),
            "p95_s": q[94] if q else float("nan"), "p99_s": q[98] if q else float("nan"),
            "tokens_per_s": tokens / wall, "errors": len(errors), "first_error": errors[0] if errors else ""}


def reference_tokens(model: str, max_tokens: int) -> dict[str, int]:
    """Each prompt's greedy answer length in tokens (eos included, as the servers count it), by model.generate."""
    import torch

    from posttrain.model.loading import load_model, load_tokenizer

    lm, tok = load_model(model), load_tokenizer(model)
    counts = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            out = lm.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            counts[prompt] = out.shape[1] - enc["input_ids"].shape[1]
    return counts


def token_counter(kind: str, reference: dict[str, int]):
    """openai: the server's usage.completion_tokens; mlflow (text only): the prompt's greedy answer length."""
    if kind == "mlflow":
        return lambda out, prompt: reference[prompt]
    return lambda out, prompt: out["usage"]["completion_tokens"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder (default: a tiny random one built in a temp folder)")
    p.add_argument("--servers", nargs="+", default=["openai", "mlflow"], choices=["openai", "openai+cb", "mlflow"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=10_000, help="per client, a bound besides --seconds")
    p.add_argument("--url", help="measure a server already running here (loopback only) instead of starting one")
    p.add_argument("--model-id", help="with --url: the model id to request (default: the first in /v1/models)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS for every server started here (default: unset, torch's default)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    from bench.common import load, machine, table
    work = Path(tempfile.mkdtemp(prefix="load-bench-"))
    model = args.model or str(build_tiny_export(work / "tiny-export"))
    reference = reference_tokens(model, args.max_tokens)
    rows: list[dict] = []
    if args.url:
        import httpx

        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--url {args.url}: loopback addresses only")
        kind = args.servers[0]
        model_id = args.model_id or (httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
                                     if kind != "mlflow" else "")
        for n in args.clients:
            rows.append(asyncio.run(run_load(args.url, kind, model_id, n, args.seconds, args.max_tokens,
                                             args.max_requests, token_counter(kind, reference))))
    else:
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        for kind in args.servers:
            port = free_port()
            log = open(work / f"{kind}.log", "w")
            t0 = time.perf_counter()
            if kind == "mlflow":
                store = work / "mlflow"
                store.mkdir(exist_ok=True)
                uri = register_for_mlflow(model, store, args.max_tokens)
                proc, health, model_id = start_mlflow(uri, store, port, log, env), f"http://127.0.0.1:{port}/ping", ""
            else:
                model_id = model
                proc = start_openai(model, port, log, cb=kind == "openai+cb", env=env)
                health = f"http://127.0.0.1:{port}/health"
            try:
                wait_ready(health, proc, args.startup_timeout)
                print(f"# {kind} ready in {time.perf_counter() - t0:.1f} s (log {log.name})", flush=True)
                # one request first, not measured: the first generate() (and the paged cache's set-up) is slow
                asyncio.run(run_load(f"http://127.0.0.1:{port}", kind, model_id, 1, 0.0, args.max_tokens, 1,
                                     token_counter(kind, reference), warmup=True))
                for n in args.clients:
                    row = asyncio.run(run_load(f"http://127.0.0.1:{port}", kind, model_id, n, args.seconds,
                                               args.max_tokens, args.max_requests, token_counter(kind, reference)))
                    rows.append(row)
                    print(f"# {json.dumps(row)}", flush=True)
            finally:
                stop(proc)
                log.close()
    print(f"\n{machine()}; load average {load()}; model {args.model or 'tiny (built here)'}; "
          f"{args.seconds:.0f} s per row, max_tokens {args.max_tokens}, temperature 0, "
          f"OMP_NUM_THREADS {args.threads or 'unset'}\n")
    print(table(["server", "clients", "requests", "req/s", "p50 s", "p95 s", "p99 s", "gen tokens/s", "errors"],
                [[r["server"], r["clients"], r["requests"], round(r["req_per_s"], 2), round(r["p50_s"], 3),
                  round(r["p95_s"], 3), round(r["p99_s"], 3), round(r["tokens_per_s"], 1), r["errors"]]
                 for r in rows]))
    for r in rows:
        if r["errors"]:
            print(f"{r['server']} x{r['clients']}: first error: {r['first_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
