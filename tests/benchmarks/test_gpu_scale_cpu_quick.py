"""benchmarks/gpu_scale.py: its CPU quick mode writes one JSONL line per measurement with the
keys the GPU run's table is made of, for every engine, model and shape, and the GRPO step with
its phases, without loading what the GPU machine lacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"card", "model", "rows", "new_tokens", "engine", "tokens_per_s", "step_s", "peak_mem_gb", "mfu"}


def run_quick(out, *args: str) -> list[dict]:
    """``gpu_scale.py --cpu --quick`` into ``out`` (exit 0 asserted); its JSONL rows."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--cpu", "--quick",
                           "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "gpu_scale_cpu.jsonl").read_text().splitlines()]


def test_cpu_quick_run_writes_every_measurement(tmp_path):
    rows = run_quick(tmp_path, "--variant", "lora:", "--variant", "static:decode=static")
    assert rows[-1]["kind"] == "done" and rows[-1]["absent_modules_loaded"] == []
    measured = [r for r in rows if r["kind"] != "done"]
    assert not [r for r in measured if "error" in r or "skipped" in r]
    for r in measured:
        assert KEYS <= set(r) and r["card"] == "cpu" and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    gen = {(r["model"], r["shape"], r["engine"], r["decode"]) for r in measured if r["kind"] == "generation"}
    engines = {("rlhf", "static"), ("rlhf", "dynamic"), ("hf_eager", None), ("hf_static_compile", None)}
    assert gen == {(m, s, e, d) for m in ("tiny-llama", "tiny-qwen2") for s in ("grpo_arith", "long")
                   for e, d in engines}
    steps = [r for r in measured if r["kind"] == "grpo_step"]
    assert {(r["model"], r["variant"], r["decode"]) for r in steps} == {
        (m, v, d) for m in ("tiny-llama", "tiny-qwen2") for v, d in (("lora", "dynamic"), ("static", "static"))}
    for r in steps:
        assert set(r["phases"]) == {"generation", "reference", "update"} and r["rows"] == 4


def test_past_the_budget_every_measurement_is_a_skipped_line(tmp_path):
    rows = run_quick(tmp_path, "--budget-s", "0", "--models", "tiny-llama")
    assert rows[-1]["kind"] == "done"
    assert len(rows) == 1 + 2 * 4 + 1 and all("skipped" in r for r in rows[:-1])  # 2 shapes x 4 engines, 1 step
