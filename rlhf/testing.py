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


def confident_head_check(device: str = "cpu", vocab: int = 4096, dim: int = 64, rows: int = 256,
                         seed: int = 11) -> dict:
    """The fused LM head (``rlhf.core.linear_logprobs``) in bf16 on confident tokens (chosen
    logits 25-43), against exact log-probs of the same bf16 inputs (float64 on the CPU).

    The head's logits z~ are the exact z = h.w (bf16 inputs: every product is exact in fp32)
    accumulated in fp32 over ``dim`` terms and rounded once to bf16: |z~_j - z_j| <= B =
    max_j (u |z_j| + dim 2^-24 sum_k |h_k w_jk|), u = 2^-8. If the chosen logit and the
    log-sum-exp both come from z~, convexity of lse puts lse(z~) - lse(z) between p.d and p~.d,
    so |log p~_i - log p_i| <= 2 max(1 - p_i, 1 - p~_i) B: the error vanishes as p -> 1. (An fp32
    dot product for the chosen logit against a bf16-rounded lse leaves the lse's rounding,
    up to u |z| ~ 0.15, uncancelled, and log p > 0.) The online lse in fp32 adds at most about
    (V + 12) 2^-24. Returns ``max_logp`` (must be <= 0), ``worst_ratio`` (the largest error over
    its bound: <= 1) and ``max_error``."""
    import torch

    from rlhf.core import linear_logprobs

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, dim, generator=gen) * 0.5).bfloat16()
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    target = 25 + 18 * torch.rand(rows, generator=gen, dtype=torch.float64)  # the chosen token's z
    wt = w[ids].double()
    h = (wt * (target / (wt**2).sum(-1))[:, None]
         + 0.02 * torch.randn(rows, dim, generator=gen, dtype=torch.float64)).bfloat16()
    logp, _ = linear_logprobs(h.to(device), w.to(device), ids.to(device), chunk=512)
    logp = logp.double().cpu()
    z = h.double() @ w.double().t()
    exact = torch.log_softmax(z, -1).gather(1, ids[:, None]).squeeze(1)
    b = (2.0**-8 * z.abs() + dim * 2.0**-24 * (h.double().abs() @ w.double().abs().t())).amax(-1)
    bound = 2 * torch.maximum(1 - exact.exp(), 1 - logp.exp()) * b + (vocab + 12) * 2.0**-24
    err = (logp - exact).abs()
    return {"max_logp": float(logp.max()), "worst_ratio": float((err / bound).max()),
            "max_error": float(err.max()), "min_chosen_logit": float(z.gather(1, ids[:, None]).min())}
