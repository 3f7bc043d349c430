"""Small random-weight models with a locally trained tokenizer, for tests and demos (no Hub access)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

Architecture = Literal["gpt2", "llama"]
ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama")

EOS = "<|endoftext|>"
# A chat template so chat datasets render through the tokenizer's own template, as with real models.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a language model with LoRA trains small adapter matrices.",
    "Gradient checkpointing trades extra compute for lower activation memory.",
    "Quantized weights in 8-bit or 4-bit save GPU memory for large models.",
    "def add(a, b):\n    return a + b\n",
    "user: What is the capital of France?\nassistant: Paris is the capital of France.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a small built-in corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(
    arch: Architecture, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, context: int = 512
) -> PretrainedConfig:
    """A config of the given architecture at toy size."""
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=context, n_embd=hidden, n_layer=layers, n_head=heads,
            bos_token_id=0, eos_token_id=0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=context, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def make_tiny_model(
    path: str | Path,
    *,
    arch: Architecture = "gpt2",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    context: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-weight causal LM and its tokenizer to `path` as safetensors; return the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, len(tokenizer), hidden=hidden, layers=layers, heads=heads, context=context)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
