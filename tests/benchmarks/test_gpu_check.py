"""benchmarks/gpu_check.py: its CPU mode runs every check (CUDA-only ones skip with a reason), and
the FLOP count it divides by is the model's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_cpu_quick_run_passes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = {r["check"]: r for r in summary["checks"]}
    assert summary["failed"] == []
    for name in ("environment", "confident_head_bf16", "grpo_bfloat16", "ppo_bfloat16", "grpo_float16", "eval", "reward_model",
                 "grpo_step_speed", "imports"):
        assert checks[name]["status"] == "pass", checks[name]
    for name in ("grpo_bfloat16", "ppo_bfloat16", "grpo_float16"):
        row = checks[name]
        assert row["max_logp_gap"] < row["gap_bound"] and row["adapter_norm"] > 0
    assert all(s > 0 for s in checks["grpo_float16"]["loss_scale"])  # the scaler ran
    speed = checks["grpo_step_speed"]
    assert set(speed["phases"]) == {"generation", "reference", "update"}
    assert all(p["s"] > 0 and p["gflop"] > 0 for p in speed["phases"].values())
    assert checks["imports"]["loaded"] == []
    # stdout: one JSON object per line, the summary last
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines[-1]["summary"] is True and lines[-1]["device"].startswith("cpu")


def test_model_sizes_are_the_models_parameter_counts(tmp_path):
    """W, R, H of the FLOP formula equal the per-layer projection weights, LoRA weights and LM
    head of a real (small) Llama with peft's LoRA on all linear layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**arch)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    s = gpu_check.model_sizes(arch, lora_r=4)
    layer0 = "base_model.model.model.layers.0."
    named = dict(model.named_parameters())
    proj = [n for n in named if n.startswith(layer0) and n.endswith("base_layer.weight")]
    lora = [n for n in named if n.startswith(layer0) and "lora_" in n]
    assert len(proj) == 7
    assert s["W"] == sum(named[n].numel() for n in proj)
    assert s["R"] == sum(named[n].numel() for n in lora)
    assert s["H"] == model.get_output_embeddings().weight.numel()
    assert s["params"] == sum(p.numel() for n, p in named.items() if "lora_" not in n)


def test_phase_flops_by_hand():
    """One layer, W = 10, R = 2, H = 5, dq = 1; one prompt of 2 tokens, completions of 1 and 2 tokens.
    Projections 2 * (10 + 2) = 24 with LoRA, 20 without; attention 4 c; the head 2 * 5 = 10."""
    s = {"L": 1, "dq": 1, "W": 10, "R": 2, "H": 5}
    f = gpu_check.phase_flops(s, prompts=1, prompt_len=2, lengths=[1, 2])
    # generation: prefill at c = 1, 2 and one head; the 2-token row decodes its second token at context 3
    assert f["generation"] == (24 + 4) + (24 + 8) + 10 + (24 + 12 + 10)
    # reference: the prompt (c = 1, 2) without LoRA, then completion tokens at contexts 3 (both rows), 4
    assert f["reference"] == (20 + 4) + (20 + 8) + 2 * (20 + 12 + 10) + (20 + 16 + 10)
    # update: 2 * 24 + 3 * 4c + 2 * 2 per token, and 4 * 5 per completion token
    tok = lambda c: 48 + 12 * c + 4  # noqa: E731
    assert f["update"] == tok(1) + tok(2) + 2 * (tok(3) + 20) + (tok(4) + 20)


def test_matmul_peak_and_bandwidth_are_positive():
    import torch

    assert gpu_check.matmul_peak(torch.device("cpu"), torch.float32, 64, 2) > 0
    assert gpu_check.bandwidth(torch.device("cpu"), 1, 2) > 0
