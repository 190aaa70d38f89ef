"""The embedded default's model: a byte-level BPE tokenizer trained on the prepared text, a small Llama from
config, and the ChatML chat template every model of the lineage speaks. distill builds its student here too."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.core.files import read_jsonl

# ChatML-style; {% generation %} marks what the assistant says, for assistant-only losses.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int
    train_files: list[str]  # JSONL files whose text the tokenizer is trained on


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool


def _texts(path: str):
    """Every string in a prepared JSONL file (corpus text, message contents)."""
    for row in read_jsonl(path):
        for value in row.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                yield from (m["content"] for m in value if isinstance(m, dict))


def train_tokenizer(cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one, so numbers share pieces and arithmetic is learnable.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((t for f in cfg.train_files for t in _texts(f)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|endoftext|>",
        unk_token=None, chat_template=CHAT_TEMPLATE,
    )


# What a student built to start from its teacher's layers must compute the way the teacher does.
TEACHER_NUMERICS = ("rope_parameters", "rope_theta", "rope_scaling", "rms_norm_eps", "hidden_act", "head_dim")


def build_tiny_model(cfg: TinyModelConfig, tokenizer, like=None):
    """A random Llama of `cfg`'s shape; `like` (a teacher's config) lends its rope, norm epsilon and activation."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    numerics = {k: getattr(like, k) for k in TEACHER_NUMERICS if like is not None and getattr(like, k, None)}
    config = LlamaConfig(**numerics,
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model
