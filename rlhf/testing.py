"""A tiny language model built from a config, for tests, smoke checks and benchmarks that must
never download: a 2-layer Llama (random weights, seed 0) with a byte-level BPE tokenizer of 300
tokens trained in milliseconds on addition prompts, and a ChatML chat template."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level BPE of 300 tokens trained on addition prompts, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"What is {a} + {b}? Answer with just the number. {a + b}" for a in range(10, 40) for b in range(60, 70)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_checkpoint(path: str | Path, **config) -> str:
    """Save the tiny model (or the Llama architecture ``config`` overrides, e.g. SmolLM2's sizes)
    with the tiny tokenizer to ``path``: random weights drawn after ``torch.manual_seed(0)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(LlamaConfig(**{**base, **config})).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)
