"""One prepared check of the LM trainer on a GPU, run in a single call (issue 16 item 4).

    python benchmarks/gpu_check.py --out DIR                      # CUDA, bf16: about 2-3 min
    python benchmarks/gpu_check.py --device cpu --quick --out DIR # the same code on a CPU, < 1 min

Needs only torch, transformers, peft, accelerate (and their own dependencies): no datasets, trl,
gymnasium, matplotlib, tensorboard, network or model weights. Every model is built from a config.
Prints one JSON line per check (``"status": "pass" | "fail" | "skip"``, a skip with its reason),
then a summary line; writes both to DIR (``checks.jsonl``, ``summary.json``); exits 1 if any check
failed.

(a) The tiny test model (tests/conftest.py's 2-layer Llama and byte-level BPE tokenizer, built
here the same way so that pytest is not needed) trained a few steps through the real trainer
(``rlhf.trainers.lm.train``) on the in-memory addition task, rewarded by ``length_penalty``
(varied within a group even for a random model, so advantages are not all 0):

- ``grpo_bfloat16``, ``ppo_bfloat16``, ``grpo_float16`` (with the loss scaler): every loss finite,
  the sampler/trainer log-prob gap (``logp_gap_rollout_trainer``, mean |log p| difference per
  token) under ``GAP_BOUND``, the adapter moved, every ``nn.Linear`` / ``nn.Embedding`` forward on
  the device, and no float64 tensor created on it (a dispatch mode watches every op's outputs);
- ``eval``: ``rlhf.lm.evaluate.evaluate_lm`` of the GRPO run, on the device;
- ``reward_model``: an ``algo: reward_model`` run, then a GRPO run rewarded by it (``rm:DIR``),
  both on the device.

(b) ``grpo_step_speed``: one GRPO step of the main recipe's shapes (recipes/grpo_arith.yaml: 8
prompts x 8 completions, 24 new tokens; prompts of ``PROMPT_TOKENS`` tokens, the length of the
addition prompt under SmolLM2's chat template) on a model with SmolLM2-135M-Instruct's config
(``SMOLLM2``) and random weights, through the trainer's own phases (``generate``,
``rollout_pass``, ``update``). Random weights almost never sample EOS, so every completion runs
the full 24 tokens: the recipe's largest step. Reports per phase the time (median of the
measured steps), the FLOPs, tokens/s, MFU against the measured matmul peak of the precision in
use, and the phase's floor ``max(FLOPs / peak, bytes / bandwidth)``.

FLOPs (``phase_flops``), counted as the math needs them (padding and recomputation not counted),
2 FLOPs per multiply-add. Per decoder layer the matmul weights are
``W = d*(2*dq + 2*dkv) + 3*d*f`` (q, o: d x dq; k, v: d x dkv; gate, up, down: d x f), LoRA adds
``R = r * sum(in + out)`` over the same 7 projections, the LM head ``H = d * V``. Over L layers
a token's projections cost ``P = 2*L*(W + R)`` forward (``2*L*W`` with the adapter off) and its
attention at context length c (itself included) ``A(c) = 4*L*c*dq`` (QK^T and AV), plus ``2*H``
where its logits are computed. With P prompts of Lp tokens and completion lengths n_i:

- generation: prefill ``sum_{c=1..Lp} (P + A(c))`` per prompt (+ one head); decode: token j >= 1
  of a row runs ``P + A(Lp + j) + 2*H`` (token 0 comes from the prefill's logits);
- reference (no grad, adapter off): each prompt once (a group shares it), then completion
  token j ``P + A(Lp + j + 1) + 2*H``;
- update (forward and backward; the base is frozen, so its backward is input gradients only):
  each token ``2*P + 3*A(c) + 2*L*R`` (projections' input gradients cost their forward again,
  attention's backward twice its forward: four matmuls to two, LoRA's weight gradients
  ``2*L*R``), and each completion token's head ``4*H`` (forward and input gradient).

Bytes: a decode step reads every weight once (``2 * params`` in bf16); the other phases are
compute-bound at these shapes and their floor is the FLOP term.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# what the GPU machine does not have: none of it may be imported on this script's path
ABSENT_THERE = ("datasets", "trl", "gymnasium", "matplotlib", "tensorboard")
# SmolLM2-135M-Instruct's config.json (the architecture; weights here are random)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
               hidden_act="silu", initializer_range=0.02)
PROMPT_TOKENS = 46  # "What is 12 + 34? ..." under SmolLM2's chat template (its system prompt included)
# Mean |log p_sampler - log p_trainer| per token. The two passes compute the same logits with
# different kernels and batch shapes, so they differ by rounding only: in float32 ~1e-6
# relative per op; in bfloat16 (8 significant bits, relative step 2^-8 = 0.004) and float16
# (11 bits) each logit carries a few steps of its precision times the logit scale (~1 here),
# and a log-prob is a difference of two such numbers. A real bug (a missing logit transform,
# the wrong temperature, a shifted position) moves log-probs by O(0.1-1) and more.
GAP_BOUND = {"float32": 1e-3, "bfloat16": 0.05, "float16": 0.05}


# ---------------------------------------------------------------------------- report
class Report:
    """JSON lines on stdout and in ``out/checks.jsonl``; ``summary`` ends it."""

    def __init__(self, out: Path):
        self.out, self.rows = out, []
        out.mkdir(parents=True, exist_ok=True)
        (out / "checks.jsonl").write_text("")

    def add(self, check: str, status: str, **fields) -> dict:
        row = {"check": check, "status": status, **fields}
        self.rows.append(row)
        line = json.dumps(row, default=_plain)
        print(line, flush=True)
        with (self.out / "checks.jsonl").open("a") as f:
            f.write(line + "\n")
        return row

    def run(self, check: str, fn, *args) -> None:
        """``fn(*args)`` returns (passed, fields) or ("skip", reason); an exception is a failure."""
        t = time.time()
        try:
            passed, fields = fn(*args)
        except Exception as exc:  # one check's crash must not hide the others' results
            tb = traceback.format_exc().strip().splitlines()[-6:]
            self.add(check, "fail", error=f"{type(exc).__name__}: {exc}", traceback=tb,
                     seconds=round(time.time() - t, 1))
            return
        if passed == "skip":
            self.add(check, "skip", reason=fields)
            return
        self.add(check, "pass" if passed else "fail", seconds=round(time.time() - t, 1), **fields)

    def summary(self, device_name: str) -> bool:
        failed = [r["check"] for r in self.rows if r["status"] == "fail"]
        row = {"summary": True, "device": device_name, "passed": sum(r["status"] == "pass" for r in self.rows),
               "failed": failed, "skipped": [r["check"] for r in self.rows if r["status"] == "skip"]}
        print(json.dumps(row), flush=True)
        (self.out / "summary.json").write_text(json.dumps({**row, "checks": self.rows}, indent=1, default=_plain))
        return not failed


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)


# ---------------------------------------------------------------------------- watching the device
class DeviceWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Inside the block: counts float64 tensors produced on a non-CPU device (MPS has no float64;
    on GPUs it is slow), and records the device of every ``nn.Linear`` / ``nn.Embedding`` forward.
    Ops inside torch's own ``GradScaler.unscale_`` are not counted: it takes the reciprocal of
    its scale in float64 on every device but MPS (torch's choice, skipped where float64 is
    missing; seen on an H200: one ``_to_copy`` and one ``reciprocal`` per fp16 step)."""

    def __init__(self):
        super().__init__()
        self.float64_on_device: dict[str, int] = {}
        self.module_devices: set[str] = set()
        self._hook = None
        self._in_scaler = 0
        self._real_unscale = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._in_scaler:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                name = str(func)
                self.float64_on_device[name] = self.float64_on_device.get(name, 0) + 1
        return out

    def _record(self, module, inputs):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            self.module_devices.add(module.weight.device.type)

    def __enter__(self):
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._record)
        self._real_unscale = real = torch.amp.GradScaler.unscale_

        def unscale_(scaler, optimizer):
            self._in_scaler += 1
            try:
                return real(scaler, optimizer)
            finally:
                self._in_scaler -= 1
        torch.amp.GradScaler.unscale_ = unscale_
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        torch.amp.GradScaler.unscale_ = self._real_unscale
        return super().__exit__(*exc)

    def fields(self, device: torch.device) -> tuple[bool, dict]:
        ok = not self.float64_on_device and self.module_devices <= {device.type}
        out = {"module_devices": sorted(self.module_devices), "float64_on_device": self.float64_on_device}
        if device.type == "cpu":
            out["placement"] = "not exercised: the device is the CPU (placement and float64 are checked on CUDA)"
        return ok, out


# ---------------------------------------------------------------------------- models
def make_checkpoint(path: Path, **config) -> str:
    """tests/conftest.py's tiny model (``rlhf.testing``), or the architecture ``config`` gives."""
    from rlhf.testing import tiny_checkpoint

    return tiny_checkpoint(path, **config)


# ---------------------------------------------------------------------------- (a) training
def train_tiny(ctx, name: str, *overrides: str) -> tuple[dict, list[dict], str, DeviceWatch]:
    """A short run of the real trainer on the tiny model; returns its summary, its metric rows,
    its directory and what the device watch saw."""
    from rlhf.config import load_recipe
    from rlhf.run import Run
    from rlhf.trainers import get_trainer

    cfg = load_recipe(None, [f"model={ctx.tiny}", "task=arith", "rewards=[length_penalty]", f"steps={ctx.steps}",
                             "prompts_per_step=2", "group_size=4", "max_new_tokens=8", "lr=0.01",
                             "save_every=0", "eval_problems=8", "eval_batch=8", f"out_dir={ctx.tmp}", *overrides])
    run = Run(cfg, run_dir=str(ctx.tmp / name))
    watch = DeviceWatch()
    with watch:
        summary = get_trainer(cfg)(cfg, run, progress=False)
    run.close()
    return summary, run.history, str(run.dir), watch


def check_training(ctx, algo: str, dtype: str):
    summary, hist, run_dir, watch = train_tiny(ctx, f"{algo}_{dtype}", f"algo={algo}", f"dtype={dtype}")
    if algo == "grpo" and dtype == ctx.dtype:
        ctx.grpo_run = run_dir
    gaps = [r.get("logp_gap_rollout_trainer") for r in hist]
    losses = [r.get("loss") for r in hist]
    finite = all(v is not None and math.isfinite(v) for v in gaps + losses)
    gap_ok = finite and max(gaps) < GAP_BOUND[dtype]
    moved = summary["adapter_norm"] > 0
    placed, seen = watch.fields(ctx.device)
    fields = {"algo": algo, "dtype": dtype, "steps": len(hist), "max_logp_gap": max(gaps) if finite else None,
              "gap_bound": GAP_BOUND[dtype], "adapter_norm": summary["adapter_norm"], "losses": losses,
              "rewards": [r["reward"] for r in hist], **seen}
    if dtype == "float16":
        fields["loss_scale"] = [r.get("amp/loss_scale") for r in hist]
        fields["overflow_steps"] = sum(bool(r.get("amp/overflow")) for r in hist)
        gap_ok = gap_ok and all(s is not None for s in fields["loss_scale"])
    return gap_ok and moved and placed, fields


def check_eval(ctx):
    from rlhf.lm.evaluate import evaluate_lm

    if ctx.grpo_run is None:
        return False, {"error": "no GRPO run to evaluate (grpo_bfloat16 failed)"}
    watch = DeviceWatch()
    with watch:
        out = evaluate_lm(ctx.grpo_run, problems=8, progress=False)
    placed, seen = watch.fields(ctx.device)
    return placed and "trained_accuracy" in out, {**out, **seen}


def check_reward_model(ctx):
    rm_summary, rm_hist, rm_dir, watch_rm = train_tiny(ctx, "rm", "algo=reward_model", "prompts_per_step=4",
                                                       "lr=0.005")
    rm_path = Path(rm_dir) / "reward_model"
    summary, hist, _, watch = train_tiny(ctx, "grpo_rm", "algo=grpo", f"rewards=[rm:{rm_path}]",
                                         f"dtype={ctx.dtype}")
    placed_rm, seen_rm = watch_rm.fields(ctx.device)
    placed, seen = watch.fields(ctx.device)
    rm_losses = [r["loss"] for r in rm_hist if "loss" in r]
    finite = all(math.isfinite(v) for v in rm_losses) and all(math.isfinite(r["reward"]) for r in hist)
    return placed_rm and placed and finite, {
        "rm_losses": rm_losses, "rm_heldout_accuracy": rm_summary.get("heldout_pairwise_accuracy"),
        "grpo_rewards": [r["reward"] for r in hist], "rm_train": seen_rm, "grpo_with_rm": seen}


# ---------------------------------------------------------------------------- (b) speed
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n product in ``dtype``, best of ``reps`` after a warm-up, as the model's
    layers compute it (``F.linear``: x @ W^T; on some CPUs a plain ``a @ b`` in bf16 takes a
    10x slower path)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    F.linear(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        F.linear(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def bandwidth(device: torch.device, mib: int, reps: int) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    x = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() / best


def model_sizes(cfg: dict, lora_r: int) -> dict:
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    dq, dkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    W = d * (2 * dq + 2 * dkv) + 3 * d * f
    R = lora_r * ((d + dq) * 2 + (d + dkv) * 2 + 3 * (d + f))
    return {"L": L, "dq": dq, "W": W, "R": R, "H": d * cfg["vocab_size"],
            "params": L * W + d * cfg["vocab_size"] + (2 * L + 1) * d}


def phase_flops(s: dict, prompts: int, prompt_len: int, lengths: list[int]) -> dict:
    """FLOPs of a GRPO step's phases (module docstring). ``lengths``: completion tokens per row."""
    L, dq, W, R, H = s["L"], s["dq"], s["W"], s["R"], s["H"]

    proj, proj_ref = 2 * L * (W + R), 2 * L * W  # a token's projections, with and without LoRA

    def attn(c: int) -> float:  # a token's attention at context length c (itself included)
        return 4 * L * c * dq

    def train(c: int) -> float:  # a token's forward and backward
        return 2 * proj + 3 * attn(c) + 2 * L * R

    completion = [prompt_len + j + 1 for n in lengths for j in range(n)]  # contexts of completion tokens
    prefill = prompts * (sum(proj + attn(c) for c in range(1, prompt_len + 1)) + 2 * H)
    decode = sum(proj + attn(prompt_len + j) + 2 * H for n in lengths for j in range(1, n))
    ref = prompts * sum(proj_ref + attn(c) for c in range(1, prompt_len + 1)) \
        + sum(proj_ref + attn(c) + 2 * H for c in completion)
    upd = prompts * sum(train(c) for c in range(1, prompt_len + 1)) + sum(train(c) + 4 * H for c in completion)
    return {"generation": prefill + decode, "reference": ref, "update": upd}


def check_speed(ctx):
    from rlhf.config import load_recipe
    from rlhf.distributed import Dist
    from rlhf.lm.rollout import rollout_pass, sampling_uniforms
    from rlhf.trainers.lm import Baseline, advantages, build, update

    arch = dict(SMOLLM2)
    over = []
    if ctx.quick:  # the same code on a model and a step small enough for a CPU test
        arch.update(num_hidden_layers=2, vocab_size=4096)
        over = ["prompts_per_step=2", "group_size=2", "max_new_tokens=4"]
    path = make_checkpoint(ctx.tmp / "smollm2-config", **arch)
    cfg = load_recipe(str(ROOT / "recipes" / "grpo_arith.yaml"),
                      [f"model={path}", f"dtype={ctx.dtype}", "save_every=0", *over])
    dist = Dist()
    policy, opt, sched = build(cfg, dist)
    dev = policy.device
    p, g, t = cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, arch["vocab_size"], (p, PROMPT_TOKENS), generator=gen).to(dev)
    prompt_mask = torch.ones_like(prompt_ids)
    n_steps = 1 if ctx.quick else 4  # the first one warms up (kernels, allocator) and is not counted
    times: dict[str, list[float]] = {"generation": [], "reference": [], "update": []}
    flops = lengths = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(n_steps):
        uniforms = sampling_uniforms(cfg.seed, range(step * p, (step + 1) * p), g, t)
        sync(dev)
        t0 = time.perf_counter()
        with dist.autocast():
            roll = policy.generate(prompt_ids, prompt_mask, g, t, uniforms=uniforms)
        sync(dev)
        t1 = time.perf_counter()
        with dist.autocast():
            passes = rollout_pass(policy, roll, cfg)
        sync(dev)
        t2 = time.perf_counter()
        rewards = torch.randn(len(roll), generator=gen).to(dev)  # rewards do not change the work
        adv, ret, _ = advantages(rewards, roll, passes, cfg, Baseline(), dist)
        stats, _ = update(policy, opt, sched, roll, adv, ret, passes, cfg, dist)
        sync(dev)
        t3 = time.perf_counter()
        if step > 0 or n_steps == 1:
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(v)
        lengths = [int(x) for x in roll.mask.sum(1).tolist()]
        flops = phase_flops(model_sizes(arch, cfg.lora_r), p, PROMPT_TOKENS, lengths)
    torch_dtype = getattr(torch, ctx.dtype)
    peak = matmul_peak(dev, torch_dtype, 512 if ctx.quick else 8192, 3 if ctx.quick else 10)
    bw = bandwidth(dev, 64 if ctx.quick else 1024, 3 if ctx.quick else 10)
    sizes = model_sizes(arch, cfg.lora_r)
    weight_bytes = sizes["params"] * torch.tensor([], dtype=torch_dtype).element_size()
    phases = {}
    for k, ts in times.items():
        sec = statistics.median(ts)
        floor = flops[k] / peak
        if k == "generation":  # the prefill and each decode step read every weight once
            floor = max(floor, max(lengths) * weight_bytes / bw)
        phases[k] = {"s": round(sec, 4), "gflop": round(flops[k] / 1e9, 2), "tflops": round(flops[k] / sec / 1e12, 3),
                     "mfu": round(flops[k] / sec / peak, 4), "floor_s": round(floor, 5),
                     "floor_fraction": round(floor / sec, 4)}
    step_s = sum(statistics.median(ts) for ts in times.values())
    completion_tokens = sum(lengths)
    fields = {"model": "SmolLM2-135M config, random weights" + (" (quick: 2 layers, vocab 4096)" if ctx.quick else ""),
              "dtype": ctx.dtype, "prompts": p, "group_size": g, "max_new_tokens": t, "prompt_tokens": PROMPT_TOKENS,
              "completion_tokens": completion_tokens, "measured_steps": len(times["update"]),
              "matmul_peak_tflops": round(peak / 1e12, 4), "bandwidth_gbs": round(bw / 1e9, 1),
              "phases": phases, "step_s": round(step_s, 4),
              "generation_tokens_per_s": round(completion_tokens / phases["generation"]["s"], 1),
              "step_tokens_per_s": round(completion_tokens / step_s, 1),
              "step_mfu": round(sum(flops.values()) / step_s / peak, 4),
              "logp_gap_rollout_trainer": stats.get("logp_gap_rollout_trainer")}
    if dev.type == "cuda":
        fields["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    ok = all(math.isfinite(v["s"]) and v["s"] > 0 for v in phases.values()) and math.isfinite(stats["loss"])
    return ok, fields


# ---------------------------------------------------------------------------- main
def check_environment(ctx):
    import accelerate
    import peft
    import transformers

    fields = {"device": ctx.device_name, "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
              "dtype": ctx.dtype, "quick": ctx.quick}
    from rlhf.distributed import partial_state

    picked = partial_state().device
    fields["accelerate_device"] = str(picked)
    return picked.type == ctx.device.type, fields


def check_confident_head(ctx):
    """The fused head in bf16 on the device, on confident tokens: log p <= 0 and every log-prob
    within the bound of one consistent rounding (``rlhf.testing.confident_head_check``)."""
    from rlhf.testing import confident_head_check

    out = confident_head_check(str(ctx.device))
    return out["max_logp"] <= 0.0 and out["worst_ratio"] <= 1.0, out


def check_imports(ctx):
    loaded = sorted(m for m in ABSENT_THERE if m in sys.modules)
    return not loaded, {"loaded": loaded, "must_not_load": list(ABSENT_THERE)}


class Context:
    def __init__(self, args, tmp: Path):
        self.device = torch.device(args.device)
        self.quick, self.tmp = args.quick, tmp
        self.steps = 2 if args.quick else 4
        self.dtype = args.dtype  # bfloat16 by default: Ampere and later GPUs, and CPUs, have it
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        self.tiny = make_checkpoint(tmp / "tiny")
        self.grpo_run = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--quick", action="store_true", help="fewer steps, a 2-layer speed model (CPU tests)")
    ap.add_argument("--out", default="gpu_check_out", help="directory for checks.jsonl and summary.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device here; run with --device cpu --quick on a CPU"}), flush=True)
        return 2
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # accelerate (rlhf.distributed) picks the CPU too
    from rlhf.run import Run

    Run.plot = lambda self, *a, **k: None  # a run's plot needs matplotlib, which the GPU machine lacks
    rep = Report(Path(args.out))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        ctx = Context(args, tmp)
        print(json.dumps({"device": ctx.device_name}), flush=True)
        rep.run("environment", check_environment, ctx)
        rep.run("confident_head_bf16", check_confident_head, ctx)
        rep.run(f"grpo_{ctx.dtype}", check_training, ctx, "grpo", ctx.dtype)
        rep.run(f"ppo_{ctx.dtype}", check_training, ctx, "ppo", ctx.dtype)
        rep.run("grpo_float16", check_training, ctx, "grpo", "float16")
        rep.run("eval", check_eval, ctx)
        rep.run("reward_model", check_reward_model, ctx)
        rep.run("grpo_step_speed", check_speed, ctx)
        rep.run("imports", check_imports, ctx)
        ok = rep.summary(ctx.device_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
