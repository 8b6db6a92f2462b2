"""benchmarks/grpo_vs_trl.py --best-precision: the precision each side gets follows the matmul
probe of rlhf/lm/precision.py (bf16 only where it beats fp32 by MIN_SPEEDUP at both the decode
and the update shape), and the reason printed says which way it went."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import grpo_vs_trl  # noqa: E402

from rlhf.lm import precision  # noqa: E402


def fake_probe(monkeypatch, f32_ms, b16_ms):
    """matmul_seconds returning fixed timings per (dtype, rows)."""
    def timed(dtype, rows=64, **_):
        table = f32_ms if dtype == torch.float32 else b16_ms
        return table[rows] / 1e3
    monkeypatch.setattr(precision, "matmul_seconds", timed)


def test_bf16_chosen_when_faster_at_both_shapes(monkeypatch):
    fake_probe(monkeypatch, {64: 1.0, 1024: 20.0}, {64: 0.2, 1024: 4.0})  # AMX-like: 5x
    dtype, why, probe = grpo_vs_trl.choose_precision()
    assert dtype == "bfloat16"
    assert probe["rows64"]["bf16_speedup"] == 5.0 and probe["rows1024"]["bf16_speedup"] == 5.0
    assert "5.00x faster" in why


def test_fp32_kept_when_bf16_is_emulated(monkeypatch):
    fake_probe(monkeypatch, {64: 1.0, 1024: 28.0}, {64: 99.0, 1024: 2160.0})  # this AMD: ~0.01x
    dtype, why, _ = grpo_vs_trl.choose_precision()
    assert dtype == "float32"
    assert "0.01x" in why and "fp32" in why


def test_one_slow_shape_keeps_fp32(monkeypatch):
    # bf16 pays for the update's 1024 rows but not for decoding's 64: the gain must hold at both
    limit = precision.MIN_SPEEDUP
    fake_probe(monkeypatch, {64: 1.0, 1024: 20.0}, {64: 1.0 / (limit * 0.9), 1024: 4.0})
    assert grpo_vs_trl.choose_precision()[0] == "float32"
