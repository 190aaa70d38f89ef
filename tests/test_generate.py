"""generate: one command answers prompts or chats with any stage's model (full or adapter) via its chat template."""

from __future__ import annotations

import io

import pytest
import torch

from posttrain.evaluation.decoding import DecodeConfig

MAX = ["--max-new-tokens", "6"]
COMPACT = DecodeConfig(engine="compact", sort_by_length=True)


def test_answers_a_prompt_through_the_chat_template(lifecycle, capsys):
    from posttrain.evaluation.scoring import generate
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.serving.generate import main

    sft = str(lifecycle["workdir"] / "models/sft")
    answers = main(["--model", sft, *MAX, "Count the words.\\n\\nred fox"])
    expected = generate(load_model(sft), load_tokenizer(sft),
                        [[{"role": "user", "content": "Count the words.\n\nred fox"}]], 6, 1, COMPACT)
    assert answers == expected
    assert capsys.readouterr().out == answers[0] + "\n"
    two = main(["--model", sft, *MAX, "What is 1 plus 2?", "Sort the numbers.\\n\\n2 1"])
    assert len(two) == 2


def test_an_adapter_folder_generates_like_its_merged_model(lifecycle, tmp_path):
    from peft import LoraConfig, get_peft_model

    from posttrain.model.loading import load_model, load_tokenizer, save_model
    from posttrain.serving.generate import load, main

    sft = lifecycle["workdir"] / "models/sft"
    model = get_peft_model(load_model(sft), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))  # non-zero: it changes outputs
    save_model(model, load_tokenizer(sft), tmp_path / "adapter", base_path=sft)
    prompt = "Reverse the words.\\n\\nred fox"
    via_adapter = main(["--model", str(tmp_path / "adapter"), *MAX, prompt])
    merged = model.merge_and_unload()
    save_model(merged, load_tokenizer(sft), tmp_path / "merged", base_path=sft)
    assert via_adapter == main(["--model", str(tmp_path / "merged"), *MAX, prompt])
    loaded, _ = load(str(tmp_path / "adapter"))  # what the command generates with: the adapter merged
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(loaded(input_ids=ids).logits, load_model(sft)(input_ids=ids).logits, atol=1e-3)


def test_chat_keeps_the_conversation_and_resets(lifecycle):
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.serving.generate import main, reply

    sft = str(lifecycle["workdir"] / "models/sft")
    out = io.StringIO()
    stdin = io.StringIO("What is 1 plus 2?\nAnd 2 plus 2?\n/reset\nAnd 2 plus 2?\n/exit\nnever read\n")
    answers = main(["--model", sft, "--chat", *MAX], stdin=stdin, stdout=out)
    assert len(answers) == 3 and out.getvalue().count("assistant> ") == 3
    model, tok = load_model(sft), load_tokenizer(sft)
    history = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": answers[0]},
               {"role": "user", "content": "And 2 plus 2?"}]
    assert answers[1] == reply(model, tok, history, 6)  # the second turn saw the first
    assert answers[2] == reply(model, tok, history[2:], 6)  # after /reset it did not


def test_a_long_chat_drops_the_oldest_turns_to_fit(lifecycle):
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.serving.generate import reply

    sft = lifecycle["workdir"] / "models/sft"
    model, tok = load_model(sft), load_tokenizer(sft)
    turn = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok " * 10}]
    history = turn * 20 + [{"role": "user", "content": "What is 1 plus 2?"}]  # far beyond 256 positions
    assert isinstance(reply(model, tok, history, 8), str)


def test_bad_invocations_explain_themselves(tmp_path):
    from posttrain.serving.generate import main

    with pytest.raises(SystemExit, match="no such model folder"):
        main(["--model", str(tmp_path / "models/nope"), "hi"])
    with pytest.raises(SystemExit) as e:
        main(["--model", "models/sft"])  # neither a prompt nor --chat
    assert e.value.code == 2
