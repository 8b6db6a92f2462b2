"""decode: static against dynamic on the CPU, in interleaved pairs (docs/speed.md, "The decode path").

    PYTHONPATH=. python benchmarks/decode_ab.py --model smollm2 --dtype float32 --pairs 3 --ends some

One grpo_arith-shaped rollout per call (8 prompts of 46 random tokens x 8 completions, at most 24
new tokens) on a Llama with random weights: ``tiny`` (the tests' 2-layer model) or ``smollm2``
(SmolLM2-135M's config). ``--ends none``: no token ends a row (every row runs 24 tokens: the two
paths do the same work, so the ratio is the fixed-shape path's own overhead); ``--ends some``: one
token in 12 is an end token, so rows end at different positions as a trained policy's do (the
dynamic path drops them from its batch; the static one keeps computing them). Each pair runs
both paths on the same uniforms, in alternating order, and checks they wrote the same tokens.
Prints one JSON line per pair and a summary: process CPU seconds and wall seconds per call, the
ratio static / dynamic per pair (CPU time), its median and range, the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from gpu_check import SMOLLM2, matmul_peak  # noqa: E402
from gpu_scale import build_model  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=0, pad_token_id=0)
P, G, LP, NEW = 8, 8, 46, 24  # recipes/grpo_arith.yaml's rollout


def one_call(fn, *args) -> tuple[float, float, object]:
    c, w = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.process_time() - c, time.perf_counter() - w, out


def main(argv=None) -> int:
    from rlhf.core.logprobs import Truncation
    from rlhf.lm.precision import resolve_dtype
    from rlhf.lm.sampler import DecodeSettings, decode
    from rlhf.lm.static_decode import decode_static

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--ends", choices=["none", "some"], default="none")
    args = ap.parse_args(argv)
    dtype = resolve_dtype(args.dtype, "cpu")
    arch = SMOLLM2 if args.model == "smollm2" else TINY
    model = build_model("llama", arch, torch.device("cpu"), getattr(torch, dtype))
    v = arch["vocab_size"]
    ids = torch.randint(3, v, (P, LP), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    eos = tuple(range(5, v, 12)) if args.ends == "some" else (-1,)
    s = DecodeSettings(1.0, Truncation(), eos, 0)
    load0 = os.getloadavg()
    peaks = {d: round(matmul_peak(torch.device("cpu"), getattr(torch, d), 1024, 3) / 1e9, 1)
             for d in ("float32", "bfloat16")}
    rows = []
    for i in range(args.pairs + 1):  # pair 0 warms up (allocator, kernels) and is not counted
        u = torch.rand(P * G, NEW, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        order = ("dynamic", "static") if i % 2 else ("static", "dynamic")
        res = {}
        for name in order:
            fn = decode if name == "dynamic" else decode_static
            res[name] = one_call(fn, model, ids, mask, G, NEW, s, False, u)
        same = torch.equal(res["dynamic"][2].completion_ids, res["static"][2].completion_ids)
        row = {"pair": i, "order": order, "same_tokens": same,
               "tokens": int(res["dynamic"][2].mask.sum()),
               **{f"{k}_cpu_s": round(r[0], 3) for k, r in res.items()},
               **{f"{k}_wall_s": round(r[1], 3) for k, r in res.items()},
               "ratio_cpu": round(res["static"][0] / res["dynamic"][0], 3)}
        print(json.dumps(row), flush=True)
        if i:
            rows.append(row)
    ratios = [r["ratio_cpu"] for r in rows]
    print(json.dumps({"summary": True, "model": args.model, "dtype": dtype, "ends": args.ends,
                      "threads": torch.get_num_threads(), "ratio_median": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "all_same_tokens": all(r["same_tokens"] for r in rows),
                      "matmul_gflops_1024": peaks, "loadavg_start": load0, "loadavg_end": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
