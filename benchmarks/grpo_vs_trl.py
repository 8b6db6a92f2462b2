"""GRPO step time: TRL's GRPOTrainer vs ours on identical work, side by side in one invocation.

    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 10 [--seeds 0 1] [--dtype float32|bfloat16]
    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 30 --seeds 0 1 --best-precision

Work (both sides): SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers, 4 prompts x
8 completions per step, at most 24 new tokens, temperature 1.0, beta 0.04 (k3 KL to the
reference), lr 2e-4 constant, token-mean loss over the step, the addition task with the same
prompts in the same order, the same reward function. Each side runs in its own subprocess (one
after the other, never concurrently) so peak memory and threads are its own.

Prints per side: time per phase (generation, reference/old log-probs, scoring, update), median
seconds per step, completion tokens per second, peak RSS, mean reward; the update phase's
achieved FLOP/s against this machine's measured matmul throughput; and last, one JSON line with
``trl_median_step_s``, ``ours_median_step_s`` and ``speedup``.

``--best-precision`` runs each side in the fastest precision this CPU offers it, and the fp32 pair
beside it. The rule is ``dtype: auto``'s (rlhf/lm/precision.py: its probe and its 1.25x margin),
checked at an update's 1024 rows as well as at the decode step's 64 that ``auto`` times (that one
probe keeps a run's start-up short): bf16 where the matmul through SmolLM2's MLP projection runs
at least 1.25x faster in bf16 than in fp32 at both, else fp32. Both sides get the same
rule because both run the same GEMMs: TRL's ``bf16=True`` is autocast on the CPU, ours bf16 base
weights with fp32 LoRA, log-probs and loss. Whether a side still learns in the precision chosen is
read from its mean reward against its own fp32 run (printed). When the rule picks fp32 for both
sides the fp32 pair is the best-precision pair and runs once. The last JSON line keeps
``speedup`` (best vs best) and adds ``fp32_speedup``, ``precision`` and ``why``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = dict(prompts=4, group=8, max_new_tokens=24, temperature=1.0, beta=0.04, lr=2e-4,
            lora_r=16, lora_alpha=32)


# ---------------------------------------------------------------------------- ours
def run_ours(steps: int, seed: int, dtype: str) -> dict:
    from rlhf.config import load_recipe
    from rlhf.run import Run
    from rlhf.trainers.lm import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(None, [
            "algo=grpo", f"steps={steps}", f"seed={seed}", f"dtype={dtype}", "save_every=0",
            f"prompts_per_step={WORK['prompts']}", f"group_size={WORK['group']}",
            f"max_new_tokens={WORK['max_new_tokens']}", f"temperature={WORK['temperature']}",
            f"kl_coef={WORK['beta']}", "kl_estimator=k3",  # TRL's default KL (no bias correction)
            f"lr={WORK['lr']}", f"lora_r={WORK['lora_r']}",
            f"lora_alpha={WORK['lora_alpha']}", "rewards=[arith_correct]", f"out_dir={tmp}"])
        run = Run(cfg, run_dir=f"{tmp}/run")
        train(cfg, run, progress=False)
        rows = run.history
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "generate_s": [r["time/generate_s"] for r in rows],
        "ref_s": [r["time/ref_s"] for r in rows],
        "score_s": [r["time/score_s"] for r in rows],
        "update_s": [r["time/update_s"] - r["time/ref_s"] for r in rows],
        "reward": [r["reward"] for r in rows],
        "completion_tokens": [r["completion_len"] * WORK["prompts"] * WORK["group"] for r in rows],
        "train_tokens": [r["tokens/train"] for r in rows],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


# ---------------------------------------------------------------------------- TRL
class PhaseTimer:
    """Wraps a bound method and adds its wall time to a bucket chosen per call."""

    def __init__(self):
        self.current: dict[str, float] = {}

    def wrap(self, obj, name, bucket):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                key = bucket() if callable(bucket) else bucket
                self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)


def run_trl(steps: int, seed: int, dtype: str) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import arith_correct
    from rlhf.lm.models import resolve_model
    from rlhf.tasks import ArithTask

    torch.manual_seed(seed)
    task = ArithTask(seed, steps * WORK["prompts"])
    it = task.train_rows()
    rows = [next(it) for _ in range(steps * WORK["prompts"])]
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    timer, per_step = PhaseTimer(), []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.current = {"t0": time.perf_counter()}

        def on_step_end(self, *a, **k):
            timer.current["step_s"] = time.perf_counter() - timer.current.pop("t0")
            per_step.append(dict(timer.current))

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=WORK["prompts"] * WORK["group"],
            num_generations=WORK["group"], max_completion_length=WORK["max_new_tokens"],
            temperature=WORK["temperature"], beta=WORK["beta"], learning_rate=WORK["lr"],
            lr_scheduler_type="constant", loss_type="dapo", logging_steps=1, use_cpu=True,
            bf16=dtype == "bfloat16", report_to="none", save_strategy="no", seed=seed,
            shuffle_dataset=False, disable_tqdm=True)
        trainer = GRPOTrainer(
            model=resolve_model("SmolLM2-135M-Instruct"), reward_funcs=arith_correct, args=args,
            train_dataset=data, callbacks=[StepClock()],
            peft_config=LoraConfig(r=WORK["lora_r"], lora_alpha=WORK["lora_alpha"],
                                   target_modules="all-linear", task_type="CAUSAL_LM"))
        timer.wrap(trainer, "_generate", "generate_s")
        timer.wrap(trainer, "_calculate_rewards", "score_s")
        timer.wrap(trainer, "_get_per_token_logps_and_entropies",
                   lambda: "update_fwd_s" if torch.is_grad_enabled() else "ref_s")
        trainer.train()
        logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "step_s": [s["step_s"] for s in per_step],
        "generate_s": [s.get("generate_s", 0.0) for s in per_step],
        "ref_s": [s.get("ref_s", 0.0) for s in per_step],
        "score_s": [s.get("score_s", 0.0) for s in per_step],
        "update_s": [s["step_s"] - s.get("generate_s", 0) - s.get("ref_s", 0) - s.get("score_s", 0)
                     for s in per_step],
        "reward": [h["reward"] for h in logs],
        "completion_tokens": [h["completions/mean_length"] * WORK["prompts"] * WORK["group"] for h in logs],
        # TRL runs every row's prompt + completion: tokens = N * (prompt + completion) per pass
        "train_tokens": [None for _ in logs],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


# ---------------------------------------------------------------------------- driver
def matmul_gflops(dtype: str, n: int = 2048, min_s: float = 1.0) -> float:
    """A 2048x2048 matmul repeated for at least ``min_s`` seconds (at ~1 GFLOP/s, bf16 on a CPU
    without bf16 units, ten repetitions would take minutes)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    reps, t = 0, time.perf_counter()
    while reps < 10 and (reps == 0 or time.perf_counter() - t < min_s):
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def update_gflop(result: dict, side: str) -> float:
    """Approximate FLOPs of one update phase (policy forward + backward to the activations; the
    frozen base gets no weight gradients): 4 * non-embedding params * tokens + LM head."""
    params_ne, head = 106.2e6, 576 * 49152
    steps = len(result["step_s"])
    flops = []
    for i in range(steps):
        comp = result["completion_tokens"][i]
        tokens = result["train_tokens"][i] if side == "ours" else comp + 32 * 46
        flops.append(4 * params_ne * tokens + 4 * head * comp)
    return statistics.median(flops) / 1e9


def worker(side: str, steps: int, seed: int, dtype: str) -> None:
    import torch

    torch.manual_seed(seed)
    out = (run_ours if side == "ours" else run_trl)(steps, seed, dtype)
    print("RESULT " + json.dumps(out))


def spawn(side: str, steps: int, seed: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--steps", str(steps), "--seeds", str(seed),
           "--dtype", dtype]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{side} worker failed (exit {done.returncode})")
    return json.loads(line[len("RESULT "):])


def summarise(side: str, runs: list[dict], peak_gflops: float) -> dict:
    med = lambda key: statistics.median(x for r in runs for x in r[key])  # noqa: E731
    step = med("step_s")
    total_tokens = sum(sum(r["completion_tokens"]) for r in runs)
    total_time = sum(sum(r["step_s"]) for r in runs)
    upd_gflop = statistics.median(update_gflop(r, side) for r in runs)
    return {
        "median_step_s": round(step, 3),
        "phases_median_s": {k: round(med(k), 3) for k in ("generate_s", "ref_s", "score_s", "update_s")},
        "completion_tokens_per_s": round(total_tokens / total_time, 1),
        "peak_rss_gb": round(max(r["peak_rss_gb"] for r in runs), 2),
        "mean_reward": round(statistics.mean(statistics.mean(r["reward"]) for r in runs), 4),
        "mean_reward_per_seed": [round(statistics.mean(r["reward"]), 4) for r in runs],
        "update_gflop_per_s": round(upd_gflop / med("update_s"), 1),
        "update_frac_of_matmul_peak": round(upd_gflop / med("update_s") / peak_gflops, 3),
    }


def choose_precision() -> tuple[str, str, dict]:
    """(dtype, why, probe timings): bf16 when it beats fp32 by ``MIN_SPEEDUP`` at both shapes."""
    import torch

    from rlhf.lm.precision import MIN_SPEEDUP, matmul_seconds

    probe = {}
    for rows in (64, 1024):
        f32 = matmul_seconds(torch.float32, rows=rows, reps=5)
        b16 = matmul_seconds(torch.bfloat16, rows=rows, reps=5)
        probe[f"rows{rows}"] = {"fp32_ms": round(f32 * 1e3, 3), "bf16_ms": round(b16 * 1e3, 3),
                                "bf16_speedup": round(f32 / b16, 2)}
    worst = min(v["bf16_speedup"] for v in probe.values())
    if worst >= MIN_SPEEDUP:
        return "bfloat16", (f"bf16 ran the model's matmul shapes at least {worst:.2f}x faster than fp32 "
                            f"on this CPU (>= {MIN_SPEEDUP}x needed)"), probe
    return "float32", (f"bf16 ran the model's matmul shapes at {worst:.2f}x the speed of fp32 on this CPU "
                       f"(a {MIN_SPEEDUP}x gain is needed to pay for the lost precision), so fp32 is "
                       "both sides' precision"), probe


def run_sides(sides, steps, seeds, dtype, peak, label) -> dict:
    results = {}
    for side in sides:
        runs = []
        for seed in seeds:
            t = time.time()
            runs.append(spawn(side, steps, seed, dtype))
            print(f"{label} {side} seed {seed}: {steps} steps in {time.time() - t:.0f} s wall "
                  f"(incl. start-up), mean reward {statistics.mean(runs[-1]['reward']):.3f}", flush=True)
        results[side] = summarise(side, runs, peak[dtype])
        print(f"{label} {side:>5}: " + json.dumps(results[side]), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sides", nargs="+", default=["trl", "ours"], choices=["trl", "ours"])
    ap.add_argument("--best-precision", action="store_true",
                    help="each side in this CPU's fastest precision, and the fp32 pair beside it")
    ap.add_argument("--worker", choices=["trl", "ours"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.seeds[0], args.dtype)
    import torch

    peak = {d: round(matmul_gflops(d), 1) for d in ("float32", "bfloat16")}
    print(f"matmul 2048x2048: {peak['float32']} GFLOP/s fp32, {peak['bfloat16']} GFLOP/s bf16, "
          f"{torch.get_num_threads()} threads", flush=True)
    if args.best_precision:
        best, why, probe = choose_precision()
        print(f"precision: {best} for both sides: {why}; probe {json.dumps(probe)}", flush=True)
        fp32 = run_sides(args.sides, args.steps, args.seeds, "float32", peak, "fp32")
        results = fp32 if best == "float32" else run_sides(args.sides, args.steps, args.seeds, best, peak, best)
    else:
        results = run_sides(args.sides, args.steps, args.seeds, args.dtype, peak, args.dtype)
    final = {"steps": args.steps, "seeds": args.seeds, "dtype": best if args.best_precision else args.dtype,
             "matmul_gflops": peak}
    for side, r in results.items():
        final[f"{side}_median_step_s"] = r["median_step_s"]
        final[f"{side}_mean_reward"] = r["mean_reward"]
    if "trl" in results and "ours" in results:
        final["speedup"] = round(results["trl"]["median_step_s"] / results["ours"]["median_step_s"], 2)
    if args.best_precision:
        final.update(precision={side: best for side in results}, why=why, probe=probe)
        for side, r in fp32.items():
            final[f"{side}_fp32_median_step_s"] = r["median_step_s"]
            final[f"{side}_fp32_mean_reward"] = r["mean_reward"]
        if "trl" in fp32 and "ours" in fp32:
            final["fp32_speedup"] = round(fp32["trl"]["median_step_s"] / fp32["ours"]["median_step_s"], 2)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
