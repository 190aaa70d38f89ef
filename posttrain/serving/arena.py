"""Chat with any model of the lineage in the browser, and compare two of them blind: the arena.

    python -m posttrain.serving.arena                                   # every stage folder under models/ that exists
    python -m posttrain.serving.arena --models models/sft models/align models/distill
    python -m posttrain.serving.arena --models models/export models:/llm-lifecycle-student@candidate --port 7861

A Gradio app on http://127.0.0.1:7860 (`--host`, `--port`) with two tabs:
- Chat: multi-turn chat with one model, picked from `--models` or typed in (a stage's folder, models/export,
  a Hugging Face id / path, or `models:/<name>@<alias>`; loaded by posttrain.serving.generate.load).
- Arena: one prompt, two different models of `--models` drawn at random and shown only as "Model A" and
  "Model B"; after both answers the user votes A, B, tie or both bad, and only then are the names shown.

An A or B vote is appended to `--votes` (default data/feedback/arena.jsonl) as a preference pair in the
prompt/chosen/rejected layout `prepare` reads (kind `preference`), with the vote's metadata in extra columns
(the reader ignores them). Ties, both-bad votes and A/B votes on a pair the preference contract would reject
(identical or empty answers) go to `--ties` instead (default data/feedback/arena_ties.jsonl), so the votes
file always reads as clean preference data. Every vote is one JSON line with a unique `id`, written whole by one
append under a lock (a thread lock and an flock on the file, so sessions and processes never interleave) and
fsynced before the page says it was recorded. Answers stream token by token, greedy unless `--temperature` > 0. Models load on first
use; at most `--max-loaded` stay in memory. Nothing is sent anywhere: Gradio's analytics are off, no share link,
and a Hugging Face id loads from the local cache only (unless HF_HUB_OFFLINE=0).
A tool, not a DVC stage: its settings are command-line flags.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import os
import random
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from posttrain.core.runtime import set_seed
from posttrain.core.stages_registry import names
from posttrain.serving.generate import load

LINEAGE = names(chat_model=True)  # models/<stage> folders, upstream first
VOTES = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


# ---------------------------------------------------------------- models


class Models:
    """Models loaded on first use and kept, at most `max_loaded` at once (the least recently used leaves first)."""

    def __init__(self, max_loaded: int):
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, tuple] = OrderedDict()
        self.lock = threading.Lock()  # one load at a time: two sessions asking for one model load it once

    def get(self, ref: str) -> tuple:
        with self.lock:
            if ref in self.loaded:
                self.loaded.move_to_end(ref)
                return self.loaded[ref]
            while len(self.loaded) >= self.max_loaded:
                self.loaded.popitem(last=False)
            gc.collect()  # free the evicted model's memory before the next one is read
            try:
                model, tokenizer = load(ref)
            except SystemExit as e:  # generate.load's message for a missing folder; the app must stay up
                raise ValueError(str(e)) from None
            if tokenizer.chat_template is None:
                raise ValueError(f"{ref}: the tokenizer has no chat template")
            self.loaded[ref] = (model, tokenizer)
            return model, tokenizer


def _encode(tokenizer, messages: list[dict], max_new_tokens: int, limit: int | None):
    """The chat prompt's ids; as posttrain.serving.generate.reply, the oldest turns are dropped until it fits the
    context."""
    while True:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        if limit is None or enc["input_ids"].shape[1] + max_new_tokens <= limit or len(messages) <= 1:
            return enc
        messages = messages[2:] if len(messages) > 2 else messages[1:]


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0) -> Iterator[str]:
    """The assistant's next turn after `messages`, yielded whole-so-far as it grows; greedy at temperature 0.

    generate() runs in a thread and feeds a TextIteratorStreamer that this generator reads; an error in the
    thread ends the stream and is raised here, so a failed generation never leaves the page waiting.
    """
    from transformers import TextIteratorStreamer

    model.eval()
    enc = _encode(tokenizer, messages, max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    enc = enc.to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            model.generate(**enc, streamer=streamer, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, **sampling)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread, which raises it
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text.strip()
    thread.join()
    if failure:
        raise failure[0]


# ---------------------------------------------------------------- votes


def vote_record(round_: dict, vote: str, time: str, vote_id: str = "") -> tuple[str, dict]:
    """("votes" or "ties", the JSON row) for `vote` on an arena round (prompt, model_a/b, reply_a/b)."""
    prompt = [{"role": "user", "content": round_["prompt"]}]
    meta = {"vote": vote, "model_a": round_["model_a"], "model_b": round_["model_b"], "time": time,
            **({"id": vote_id} if vote_id else {})}
    if vote in ("A", "B"):
        win, lose = ("a", "b") if vote == "A" else ("b", "a")
        pair = {"prompt": prompt, "chosen": round_[f"reply_{win}"], "rejected": round_[f"reply_{lose}"]}
        problems = _contract_problems(pair)
        if not problems:
            return "votes", {**pair, **meta, "chosen_model": round_[f"model_{win}"],
                             "rejected_model": round_[f"model_{lose}"]}
        reason = "not a valid preference pair: " + "; ".join(problems)
    else:
        reason = VOTES[vote].lower()
    return "ties", {"prompt": prompt, "reply_a": round_["reply_a"], "reply_b": round_["reply_b"], **meta,
                    "reason": reason}


def _contract_problems(pair: dict) -> list[str]:
    """The preference schema's complaints about one pair (identical or empty answers), as the reader would say."""
    import pandas as pd

    from posttrain.data.readers import validate_frame

    df = pd.DataFrame([pair], columns=["prompt", "chosen", "rejected"], index=[1], dtype=object)
    return [p.message if p.column is None else f"{p.column}: {p.message}"
            for p in validate_frame(df, "preference", "vote")]


class VoteLog:
    """Appends votes, one JSON line each, to the votes or the ties file; a vote written is on disk."""

    def __init__(self, votes: Path, ties: Path):
        self.paths = {"votes": Path(votes), "ties": Path(ties)}

    def record(self, round_: dict, vote: str, vote_id: str | None = None) -> Path:
        """Append the vote (with `vote_id`, a fresh one if None) and return the file it went to."""
        which, row = vote_record(round_, vote, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 vote_id or new_vote_id())
        path = self.paths[which]
        append_line(path, json.dumps(row, ensure_ascii=False))
        return path


def new_vote_id() -> str:
    return uuid.uuid4().hex


_APPEND_LOCK = threading.Lock()  # one appender per process; flock below keeps other processes out


def append_line(path: Path, line: str) -> None:
    """Append one line durably and whole, safe from threads and from other processes writing the same file.

    Under a thread lock and an exclusive flock on the file: one os.write of the whole line to an O_APPEND
    descriptor, then fsync (and fsync of the folder when the file is new), all before returning. A last line
    without its newline can only be left by a writer that died mid-write (a live one holds the lock): if it
    reads as JSON it is kept and ended, otherwise it is moved to `<file>.torn` and cut, so the file stays
    valid JSONL and the vote that was in flight is all a crash loses.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    new = not path.exists()
    with _APPEND_LOCK:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the close below, or by the kernel if this process dies
            data = _mend_torn_tail(fd, path) + data
            view = memoryview(data)
            while view:  # a regular file takes it in one write; a short one (disk full, signal) goes on from there
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    if new:  # the file's directory entry must reach the disk too, or a crash can lose the whole new file
        _fsync_dir(path.parent)


def _mend_torn_tail(fd: int, path: Path) -> bytes:
    """What to write before the next line: b"" after a whole last line; b"\\n" after a last line that is whole
    JSON but lacks its newline; after a torn one (not JSON), b"" once it is moved to `<path>.torn` and cut."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return b""
    start = size
    while start > 0:  # back to the byte after the last newline
        chunk = os.pread(fd, min(65536, start), start - min(65536, start))
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            start = start - len(chunk) + cut + 1
            break
        start -= len(chunk)
    tail = os.pread(fd, size - start, start)
    try:
        if isinstance(json.loads(tail), dict):
            return b"\n"
    except ValueError:  # not JSON, or not UTF-8
        pass
    aside = path.with_name(path.name + ".torn")
    with aside.open("ab") as f:  # kept, not lost, before it is cut: a crash here leaves it in both places
        f.write(tail + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.ftruncate(fd, start)
    return b""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the app


class Arena:
    """The app's state shared by all browser sessions: the model list, the loaded models and the vote files."""

    def __init__(self, args: argparse.Namespace):
        self.refs, self.args = args.models, args
        self.models = Models(args.max_loaded)
        self.votes = VoteLog(args.votes, args.ties)
        self.rng = random.Random()  # which model is A: unpredictable, so the arena stays blind

    def stream(self, ref: str, messages: list[dict]) -> Iterator[str]:
        import gradio as gr

        try:
            model, tokenizer = self.models.get(ref)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        yield from stream_reply(model, tokenizer, messages, self.args.max_new_tokens, self.args.temperature,
                                self.args.top_p)

    # chat tab

    def chat_send(self, message: str, history: list[dict], ref: str):
        """Outputs: the cleared input, the chatbot, the conversation."""
        if not message.strip():
            yield message, history, history
            return
        history = [*history, {"role": "user", "content": message}]
        yield "", [*history, {"role": "assistant", "content": ""}], history
        answer = ""
        for answer in self.stream(ref, history):
            yield "", [*history, {"role": "assistant", "content": answer}], history
        history = [*history, {"role": "assistant", "content": answer}]
        yield "", history, history

    # arena tab

    def arena_send(self, prompt: str, round_: dict | None):
        """Outputs: reply A, reply B, the round, the four vote buttons, the status line."""
        import gradio as gr

        if len(self.refs) < 2:
            raise gr.Error("The arena compares two models: start the app with two or more --models.")
        if not prompt.strip():
            raise gr.Error("Write a prompt first.")
        a, b = self.rng.sample(self.refs, 2)
        round_ = {"prompt": prompt, "model_a": a, "model_b": b, "reply_a": "", "reply_b": "", "done": False,
                  "voted": False}
        closed = [gr.Button(interactive=False)] * len(VOTES)
        yield gr.Textbox(value="", label="Model A"), gr.Textbox(value="", label="Model B"), round_, *closed, \
            "Model A is answering..."
        # One model after the other: on a CPU two generations at once would only share the same cores.
        messages = [{"role": "user", "content": prompt}]
        for text in self.stream(a, messages):
            round_["reply_a"] = text
            yield text, "", round_, *closed, "Model A is answering..."
        for text in self.stream(b, messages):
            round_["reply_b"] = text
            yield round_["reply_a"], text, round_, *closed, "Model B is answering..."
        round_["done"] = True
        yield round_["reply_a"], round_["reply_b"], round_, *[gr.Button(interactive=True)] * len(VOTES), \
            "Which answer is better? The models' names are shown after your vote."

    def arena_vote(self, vote: str, round_: dict | None):
        """Outputs: as arena_send's."""
        import gradio as gr

        if not round_ or not round_["done"] or round_["voted"]:
            raise gr.Error("Send a prompt and wait for both answers; each round takes one vote.")
        vote_id = new_vote_id()
        path = self.votes.record(round_, vote, vote_id)
        round_ = {**round_, "voted": True}
        a, b = round_["model_a"], round_["model_b"]
        status = f"Recorded **{VOTES[vote]}** in `{path}` (vote `{vote_id}`). Model A was `{a}`, Model B was `{b}`."
        return gr.Textbox(label=f"Model A: {a}"), gr.Textbox(label=f"Model B: {b}"), round_, \
            *[gr.Button(interactive=False)] * len(VOTES), status

    def build(self):
        import gradio as gr

        with gr.Blocks(title="llm-lifecycle arena", analytics_enabled=False) as app:
            with gr.Tab("Chat", id="chat"):
                model = gr.Dropdown(self.refs, value=self.refs[0], allow_custom_value=True, elem_id="chat-model",
                                    label="Model: a stage folder, models/export, or models:/<name>@<alias>")
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot")
                message = gr.Textbox(label="Message", elem_id="chat-input")
                with gr.Row():
                    chat_send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    clear = gr.Button("Clear", elem_id="chat-clear")
                history = gr.State([])
                for event in (chat_send.click, message.submit):
                    event(self.chat_send, [message, history, model], [message, chatbot, history],
                          concurrency_id="generate", concurrency_limit=1)
                clear.click(lambda: ([], []), None, [chatbot, history])
                model.change(lambda: ([], []), None, [chatbot, history])  # a new model starts a new conversation
            with gr.Tab("Arena", id="arena"):
                gr.Markdown("Two anonymous models answer the same prompt. Vote for the better answer; "
                            "their names are shown after the vote.")
                with gr.Row():
                    reply_a = gr.Textbox(label="Model A", lines=8, interactive=False, elem_id="reply-a")
                    reply_b = gr.Textbox(label="Model B", lines=8, interactive=False, elem_id="reply-b")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="arena-prompt")
                send = gr.Button("Send", variant="primary", elem_id="arena-send")
                with gr.Row():
                    buttons = [gr.Button(label, interactive=False, elem_id=f"vote-{key.replace('_', '-').lower()}")
                               for key, label in VOTES.items()]
                status = gr.Markdown(elem_id="arena-status")
                round_ = gr.State(None)
                outputs = [reply_a, reply_b, round_, *buttons, status]
                # concurrency_id: every generation, in either tab and any session, queues for one worker
                send.click(self.arena_send, [prompt, round_], outputs, concurrency_id="generate",
                           concurrency_limit=1)
                for key, button in zip(VOTES, buttons):
                    button.click(lambda r, key=key: self.arena_vote(key, r), [round_], outputs)
        return app


def default_models() -> list[str]:
    """The lineage's stage folders that exist under models/, upstream first."""
    return [f"models/{stage}" for stage in LINEAGE if Path("models", stage).exists()]


def quiet_network() -> None:
    """Nothing leaves the machine: set before gradio and huggingface_hub are first imported (both read these then).

    No Gradio usage analytics or version check; no hub telemetry; a hub id typed into the chat loads only from
    the local cache (HF_HUB_OFFLINE=0 in the environment allows downloads).
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m posttrain.serving.arena", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="stage folders, HF ids/paths or models:/<name>@<alias> (default: the models/<stage> "
                             f"folders that exist, of {', '.join(LINEAGE)})")
    parser.add_argument("--votes", type=Path, default=Path("data/feedback/arena.jsonl"),
                        help="A/B votes, appended as preference pairs (prompt, chosen, rejected)")
    parser.add_argument("--ties", type=Path, default=Path("data/feedback/arena_ties.jsonl"),
                        help="tie and both-bad votes, and A/B votes on pairs that are no valid preference pair")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-loaded", type=int, default=3, help="models kept in memory at once")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (temperature > 0)")
    args = parser.parse_args(argv)
    args.models = list(dict.fromkeys(args.models or default_models()))  # a model listed twice is one model
    if not args.models:
        parser.error("no models: give --models, or run the lifecycle first (dvc repro) to fill models/")
    for ref in args.models:  # the rule generate.load applies, checked before the app starts
        if not Path(ref).exists() and ref.startswith(("models/", "./", "/")):
            raise SystemExit(f"{ref}: no such model folder (run the stage that writes it, e.g. dvc repro)")
    if args.max_loaded < 1:
        parser.error("--max-loaded must be at least 1")
    quiet_network()
    set_seed(args.seed)
    app = Arena(args).build()
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, mcp_server=False,
                       pwa=False, footer_links=[], show_error=True)


if __name__ == "__main__":
    main()
