"""Peak memory of one optimiser step's gradients against micro_batch_size, on the CPU.

    python benchmarks/micro_batch_memory.py                       # a small Llama, ~1 min on 2 cores
    python benchmarks/micro_batch_memory.py --shape qwen2.5-0.5b  # Qwen2.5-0.5B's shape (random weights)

Each setting runs in its own process (peak RSS, ``ru_maxrss``, only grows within a process):
the model (random weights from a config, LoRA r 8) and a rollout of random token ids are built,
then one minibatch's gradients are accumulated (``rlhf.trainers.lm.minibatch_gradients``, the
trainer's own update path). Printed per setting, one JSON line: the peak RSS before the update
(model, optimiser-free setup), after it, and the increase the update caused.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

SHAPES = {  # Llama-architecture configs; random weights
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(model: str, micro: int, prompts: int, group: int, prompt_len: int, tokens: int) -> dict:
    import torch

    from rlhf.config import LMConfig
    from rlhf.distributed import ONE_PROCESS
    from rlhf.lm.policy import LMPolicy
    from rlhf.lm.rollout import RolloutPass
    from rlhf.lm.rollout_record import Rollout
    from rlhf.trainers.lm import minibatch_gradients

    torch.manual_seed(0)
    policy = LMPolicy(model, lora_r=8, lora_alpha=16)
    vocab = policy.model.config.vocab_size
    n = prompts * group
    roll = Rollout(torch.randint(3, vocab, (prompts, prompt_len)), torch.ones(prompts, prompt_len, dtype=torch.long),
                   torch.randint(3, vocab, (n, tokens)), torch.ones(n, tokens), torch.zeros(n, dtype=torch.bool),
                   group_size=group)
    cfg = LMConfig(micro_batch_size=micro, max_new_tokens=tokens, kl_coef=0.0, tis="none")
    before = peak_mb()
    _, _, bad = minibatch_gradients(policy, roll, torch.arange(prompts), torch.randn(n), None,
                                    RolloutPass(None, None, None), roll.mask, cfg, ONE_PROCESS, None, first=False)
    after = peak_mb()
    return {"micro_batch_size": micro, "rows": n, "tokens": tokens, "peak_rss_before_update_mb": round(before),
            "peak_rss_after_update_mb": round(after), "update_increase_mb": round(after - before), "bad": bad}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--micro", default="0,8,2,1", help="micro_batch_size values, comma-separated")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.model, a.one, a.prompts, a.group, a.prompt_len, a.tokens)))
        return
    from rlhf.testing import tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        model = tiny_checkpoint(d, **SHAPES[a.shape])
        for micro in (int(x) for x in a.micro.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", str(micro), "--model", model,
                                  "--prompts", str(a.prompts), "--group", str(a.group),
                                  "--prompt-len", str(a.prompt_len), "--tokens", str(a.tokens)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"shape": a.shape, **row}), flush=True)


if __name__ == "__main__":
    main()
