"""Generate from, or chat with, any stage's model.

    python -m posttrain.serving.generate --model models/sft "Count the words.\\n\\nblue fox gold"
    python -m posttrain.serving.generate --model models/distill --chat
    python -m posttrain.serving.generate --model models:/llm-lifecycle-student@candidate "What is 2 plus 3?"

`--model` is a stage's output folder (a full model or an adapter: adapter chains are followed and
merged), a Hugging Face id / path, or an MLflow registry URI (`models:/<name>@<alias>` or
`models:/<name>/<version>`, read from params.yaml's `tracking.uri`, else $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db). Prompts go through the model's chat template; `\\n` in a prompt is a newline.
In `--chat` every line is a user turn; `/reset` clears the conversation, `/exit` or EOF quits.
A tool, not a DVC stage: its settings are command-line flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from posttrain.core.runtime import set_seed


def load(ref: str):
    """(model, tokenizer) from a stage folder, a Hugging Face id / path or an MLflow models:/ URI."""
    if ref.startswith("models:/"):
        import mlflow

        from posttrain.core.config import read_params
        from posttrain.core.tracking import tracking_uri

        configured = read_params().get("tracking", {}).get("uri", "") if Path("params.yaml").exists() else ""
        mlflow.set_tracking_uri(tracking_uri(configured))
        parts = mlflow.transformers.load_model(ref, return_type="components")
        return parts["model"], parts["tokenizer"]
    from posttrain.model.loading import load_model, load_tokenizer

    if not Path(ref).exists() and ref.startswith(("models/", "./", "/")):
        raise SystemExit(f"{ref}: no such model folder (run the stage that writes it, e.g. dvc repro)")
    return load_model(ref), load_tokenizer(ref)


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float = 0.0,
          top_p: float = 1.0) -> str:
    """The assistant's next turn after `messages`, greedy at temperature 0, else sampled."""
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    while True:  # drop the oldest turns that no longer fit the context window
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        if limit is None or enc["input_ids"].shape[1] + max_new_tokens <= limit or len(messages) <= 1:
            break
        messages = messages[2:] if len(messages) > 2 else messages[1:]
    enc = enc.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat(model, tokenizer, args, stdin, stdout) -> list[str]:
    """Interactive loop; returns every answer given."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, answers = list(system), []
    interactive = stdin.isatty()
    print("chat: /reset clears the conversation, /exit quits", file=stdout, flush=True)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return answers
        text = line.rstrip("\n").replace("\\n", "\n")
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, args.max_new_tokens, args.temperature, args.top_p)
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        print(f"assistant> {answer}", file=stdout, flush=True)


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> list[str]:
    """Run the command; returns the answers (also printed)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m posttrain.serving.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", help="user messages, each answered on its own")
    parser.add_argument("--model", required=True, help="stage folder, HF id/path, or models:/<name>@<alias>")
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    parser.add_argument("--system", default="", help="optional system message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not args.prompts and not args.chat:
        parser.error("give one or more prompts, or --chat")
    set_seed(args.seed)
    model, tokenizer = load(args.model)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{args.model}: the tokenizer has no chat template")
    if args.chat:
        return chat(model, tokenizer, args, stdin, stdout)
    system = [{"role": "system", "content": args.system}] if args.system else []
    answers = []
    for prompt in args.prompts:
        answer = reply(model, tokenizer, system + [{"role": "user", "content": prompt.replace("\\n", "\n")}],
                       args.max_new_tokens, args.temperature, args.top_p)
        answers.append(answer)
        print(answer if len(args.prompts) == 1 else f"[{prompt!r}] {answer}", file=stdout, flush=True)
    return answers


if __name__ == "__main__":
    main()
