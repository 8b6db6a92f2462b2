"""How close a GRPO step runs to this machine's limit: measured peaks, each phase's floor, and
the achieved time and fraction of it, for a recipe's shapes (default recipes/grpo_arith.yaml).

    python benchmarks/floor.py [--recipe grpo_arith] [--steps 3] [--threads 1] [--set dtype=auto ...]

Runs on the CPU, or on CUDA where the trainer finds a GPU (accelerate's device). Prints one table
per measured step and a last JSON line. Phases are timed as the trainer runs them (its own
``collect``, ``rollout_pass`` and ``update``); on the CPU both wall and process CPU time are
taken (CPU time is what a shared machine does not inflate), the fraction uses the smaller.

Measured peaks (``--threads`` threads; on a shared CPU give one, and a run counts min(wall,
CPU time / threads)):
  matmul fp32 / bf16: best of 5 [n, n] x [n, n] matmuls, 2 n^3 FLOP each (n = 1024 on the CPU,
    8192 on CUDA); the phases' floor uses the peak of the precision the base weights run in.
  memory bandwidth BW: the larger of a read (``sum`` over a 256 MiB fp32 tensor: 1x its bytes)
    and a copy (read + write: 2x) of it, best of 5. The larger one makes the floor lower.

FLOPs, for the model's config (d hidden, d_kv = kv heads x head dim, f MLP width, L layers,
V vocabulary, r LoRA rank on q, k, v, o, gate, up, down) and a token at context length c:
  F_lin = L (2 d (2 d + 2 d_kv) + 6 d f)          the decoder's linear layers
  F_lora = L 2 r (9 d + 2 d_kv + 3 f)             2 r (in + out) of each adapted layer
  F_att(c) = L 4 c d                               q k^T and the weighted sum of v
  F_head = 2 d V                                   the LM head (run only where a log-prob is needed)
  tok(c) = F_lin + F_lora + F_att(c)

Phases, with P prompts of Lp tokens (as tokenized, padding included), N = P G completions, n_t rows
still live at decode position t, T = sum_t n_t completion tokens (the real ones) and W the bytes of
the weights (base in its dtype, adapter fp32):
  generation = prefill + decode
    prefill = P Lp tok(Lp) / peak   (the prompt's head runs on its last token only: + P F_head)
    decode  = sum_t max(n_t (tok(Lp + t) + F_head) / peak,  (W + KV_t) / BW)
      every position reads all weights once (W) and the live rows' KV cache
      KV_t = n_t L 2 d_kv (Lp + t) bytes-per-element
  reference = (P Lp tok(Lp) + T tok(Lp + C/2) + T F_head) / peak     one forward, prompt once per group
  update = 2 x reference's FLOPs / peak: forward + backward. The base is frozen, so backward
    computes gradients of the activations only (one GEMM per layer, as many FLOPs as forward) and
    the rank-r adapters' (counted in F_lora); recomputation (checkpointing, the fused head's
    block recompute) is the implementation's choice and not in the floor.
Achieved fraction = floor / achieved time (1 = at the limit). The optimiser step (a few MB of
adapter) and scoring are not in the floor.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


# ---------------------------------------------------------------------------- machine
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, reps: int = 5) -> float:
    """Best of ``reps`` seconds. On the CPU each run counts as min(wall, CPU time / threads):
    the kernels here keep every thread busy, so on a shared machine CPU time / threads is the
    wall time the run would take with the cores to itself."""
    fn()
    _sync(device)
    best, threads = float("inf"), torch.get_num_threads()
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        best = min(best, wall if device.type == "cuda" else min(wall, cpu / threads))
    return best


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None) -> float:
    """FLOP/s of the best of 5 [n, n] x [n, n] matmuls in ``dtype``."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if device.type == "cpu" and dtype != torch.float32:  # no native bf16: ~1 GFLOP/s, keep it short
        from rlhf.lm.precision import matmul_seconds
        if matmul_seconds(dtype) > 4 * matmul_seconds(torch.float32):
            n = 256
            a, b = a[:n, :n].contiguous(), b[:n, :n].contiguous()
    return 2 * n ** 3 / _best(lambda: a @ b, device)


def bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s: the larger of a read of ``mib`` MiB (sum) and a copy of it (read + write)."""
    x = torch.ones(mib * 2 ** 18, device=device)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    read = nbytes / _best(lambda: x.sum(), device)
    copy = 2 * nbytes / _best(lambda: y.copy_(x), device)
    return max(read, copy)


# ---------------------------------------------------------------------------- floors
def flops_model(config, lora_r: int) -> dict:
    d, f, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = config.num_key_value_heads * head_dim
    lin = layers * (2 * d * (2 * d + 2 * d_kv) + 6 * d * f)
    # LoRA: A (in -> r) and B (r -> out) of q, k, v, o, gate, up, down
    lora = layers * 2 * lora_r * ((d + d) + (d + d_kv) * 2 + (d + d) + (d + f) * 2 + (f + d))
    return {"d": d, "d_kv": d_kv, "layers": layers, "lin": lin, "lora": lora, "head": 2 * d * v}


def tok_flops(m: dict, ctx: float) -> float:
    return m["lin"] + m["lora"] + m["layers"] * 4 * ctx * m["d"]


def floors(m: dict, p: int, lp: int, live: list[int], weight_bytes: float, elt: int,
           peak: float, bw: float) -> dict:
    """Seconds of each phase at the machine's limit (module docstring)."""
    t_tokens = sum(live)
    prefill = (p * lp * tok_flops(m, lp) + p * m["head"]) / peak
    decode = sum(max(n * (tok_flops(m, lp + t) + m["head"]) / peak,
                     (weight_bytes + n * m["layers"] * 2 * m["d_kv"] * (lp + t) * elt) / bw)
                 for t, n in enumerate(live) if n)
    fwd = p * lp * tok_flops(m, lp) + t_tokens * (tok_flops(m, lp + len(live) / 2) + m["head"])
    return {"generation": prefill + decode, "reference": fwd / peak, "update": 2 * fwd / peak,
            "_decode_weight_reads_s": sum(weight_bytes / bw for n in live if n)}


# ---------------------------------------------------------------------------- one step
class Clock:
    """Wall and process CPU seconds of a block (CUDA: synchronised)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_steps(cfg, steps: int):
    """Yield, per step, the rollout and the wall/CPU seconds of generation, reference and update,
    run by the trainer's own functions in the trainer's order."""
    from rlhf.distributed import Dist
    from rlhf.rewards import load_rewards, score
    from rlhf.seeding import seed_everything
    from rlhf.tasks import task_from_config
    from rlhf.trainers.lm import Baseline, advantages, build, rank_uniforms, update
    from rlhf.lm.rollout import collect, rollout_pass

    dist = Dist()
    seed_everything(cfg.seed, cfg.threads)
    task = task_from_config(cfg)
    fns = load_rewards(cfg.rewards, cfg.reward_timeout_s, cfg.reward_workers)
    policy, opt, sched = build(cfg, dist)
    rows_iter, baseline = task.train_rows(), Baseline()
    dev = policy.device
    for step in range(steps):
        rows = [next(rows_iter) for _ in range(cfg.prompts_per_step)]
        with Clock(dev) as gen:
            roll, prompts, completions, columns = collect(policy, rows, cfg, uniforms=rank_uniforms(cfg, step, dist))
        rewards, _, scored = score(fns, prompts, completions, columns)
        rewards = rewards.to(dev)
        with Clock(dev) as ref:
            passes = rollout_pass(policy, roll, cfg)
        adv, ret, _ = advantages(rewards, roll, passes, cfg, baseline, dist, scored.to(dev) > 0)
        with Clock(dev) as upd:
            update(policy, opt, sched, roll, adv, ret, passes, cfg, dist)
        yield policy, roll, {"generation": gen, "reference": ref, "update": upd}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="grpo_arith")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (the first one is reported apart)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="recipe key=value")
    args = ap.parse_args(argv)
    from rlhf.catalog import find_recipe
    from rlhf.config import load_recipe

    cfg = load_recipe(find_recipe(args.recipe), [f"threads={args.threads}", "save_every=0", *args.overrides])
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for i, (policy, roll, clocks) in enumerate(run_steps(cfg, args.steps)):
        if i == 0:  # the machine, measured once the model is loaded (same threads, same device)
            dev = policy.device
            dtype = getattr(torch, policy.dtype)
            peaks = {"fp32": matmul_peak(torch.float32, dev), "bf16": matmul_peak(torch.bfloat16, dev)}
            bw = bandwidth(dev)
            peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
            base = policy.model.get_base_model()
            m = flops_model(base.config, cfg.lora_r)
            weight_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
            print(f"device {dev} ({_device_name(dev)}), threads {torch.get_num_threads()}, "
                  f"base weights {policy.dtype}: matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
                  f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; bandwidth {bw / 1e9:.1f} GB/s; "
                  f"weights {weight_bytes / 1e6:.0f} MB")
        live = [int(n) for n in roll.mask.sum(0).tolist()]
        p, lp = roll.prompt_ids.shape
        fl = floors(m, p, lp, live, weight_bytes, dtype.itemsize, peak, bw)
        if not cfg.kl_coef:  # no reference pass in the step
            fl["reference"] = 0.0
        row = {"step": i + 1, "prompt_tokens": p * lp, "completion_tokens": sum(live)}
        print(f"step {i + 1}: {p} prompts x {lp} tokens, {len(roll)} completions, {sum(live)} completion tokens")
        print(f"  {'phase':<11}{'floor s':>9}{'wall s':>9}{'cpu s':>9}{'fraction':>10}")
        for name, clock in clocks.items():
            achieved = min(clock.wall, clock.cpu) if dev.type == "cpu" else clock.wall
            frac = fl[name] / achieved if achieved else float("nan")
            print(f"  {name:<11}{fl[name]:>9.2f}{clock.wall:>9.2f}{clock.cpu:>9.2f}{frac:>10.2f}")
            row[name] = {"floor_s": round(fl[name], 3), "wall_s": round(clock.wall, 3),
                         "cpu_s": round(clock.cpu, 3), "fraction": round(frac, 3)}
        print(f"  (generation's floor includes {fl['_decode_weight_reads_s']:.2f} s of weight reads, "
              f"one per decode position)")
        results.append(row)
    out = {"device": str(dev), "device_name": _device_name(dev), "threads": torch.get_num_threads(),
           "dtype": policy.dtype, "matmul_fp32_gflops": round(peaks["fp32"] / 1e9, 1),
           "matmul_bf16_gflops": round(peaks["bf16"] / 1e9, 1), "bandwidth_gbs": round(bw / 1e9, 1),
           "steps": results}
    print(json.dumps(out))
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


if __name__ == "__main__":
    main()
