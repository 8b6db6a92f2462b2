"""Which precision the frozen base weights run in: ``dtype: float32 | bfloat16 | float16 | auto``.

bf16 base weights halve the bytes every decode step reads and, where the hardware has bf16
matrix units (GPUs since Ampere, Intel AMX, AVX512-BF16), run the GEMMs several times faster.
What stays fp32 under bf16: the LoRA adapter's weights (peft keeps adapters fp32 on a
lower-precision base), their gradients and optimiser state, the logits once out of the head
GEMM (log-softmax, log-probs, loss, sampling), and a value head.

``auto`` picks bf16 only where it is faster: on CUDA where the card supports bf16, on a CPU
where a small matmul of the model's shape runs faster in bf16 than in fp32 (measured once per
process). A CPU without native bf16 arithmetic falls back to a slow reference kernel (measured
on a 2-core AMD EPYC without AVX512-BF16: ~1 GFLOP/s in bf16 against ~70 in fp32), so a flag
check alone could not tell it from one that has it; the probe asks the kernel torch will use.
"""
from __future__ import annotations

import functools
import time

import torch

from rlhf.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # float16: GPUs without bf16, with a loss scaler
# bf16 must beat fp32 by this factor to be chosen: it costs precision, so a tie is not enough
# (the probe's spread under load is well inside it: on the machines measured bf16 was either
# ~5x faster, Intel AMX, or ~50x slower, AMD without AVX512-BF16)
MIN_SPEEDUP = 1.25


def resolve_dtype(name: str, device: torch.device | str | None = None) -> str:
    """``float32``, ``bfloat16`` or ``float16`` for the recipe's ``dtype`` on ``device`` (default: CUDA when
    available, else the CPU)."""
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPES)}; use auto (bf16 where this "
                        "machine runs it faster), float32, bfloat16 or float16 (GPUs without bf16)")
    if name != "auto":
        return name
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return "bfloat16" if bf16_is_faster(device.type) else "float32"


@functools.cache
def bf16_is_faster(device_type: str) -> bool:
    """Whether bf16 matmuls pay on this kind of device (cached: probed once per process)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return matmul_seconds(torch.float32) / matmul_seconds(torch.bfloat16) >= MIN_SPEEDUP


def matmul_seconds(dtype: torch.dtype, rows: int = 64, inner: int = 576, out: int = 1536, reps: int = 3) -> float:
    """Best of ``reps`` timings of one [rows, inner] x [inner, out] CPU matmul in ``dtype``: the
    shape of a decode step's MLP projection in SmolLM2-135M (64 rows, hidden 576, MLP 1536),
    ~0.1 GFLOP, a few ms in fp32. Best-of, so a preempted repetition does not decide it."""
    a = torch.randn(rows, inner).to(dtype)
    b = torch.randn(inner, out).to(dtype)
    a @ b  # first call: kernel selection, allocation
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best
