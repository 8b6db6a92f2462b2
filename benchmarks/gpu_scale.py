"""Generation and GRPO-step speed at real model sizes on one GPU, in one prepared run (issue 25 item 5).

    python benchmarks/gpu_scale.py --out docs/data                 # CUDA, bf16: ~6-8 min on an H100
    python benchmarks/gpu_scale.py --cpu --quick --out DIR         # tiny shapes on the CPU (< 1 min, the test)

Needs only torch, transformers, peft, accelerate: no datasets, trl, Hub or weights. Every model is
built from its config in code (random weights, bf16): SmolLM2-135M (Llama), Qwen2.5-0.5B and
Qwen2.5-1.5B (Qwen2), with the tests' tiny tokenizer (prompts are random ids; completions never
end early: no EOS is possible for our sampler, ``min_new_tokens`` for transformers', so every
engine writes rows x new_tokens tokens).

Writes ``OUT/gpu_scale_<card>.jsonl`` (card: h100, h200, ... or cpu), one JSON line per
measurement, flushed as it is made (a run cut short keeps what it measured):

- ``kind: generation``: tokens/s of one rollout (P prompts x G completions, Lp prompt tokens,
  ``new_tokens`` each) for ``engine`` ``rlhf`` (our sampler; ``decode`` dynamic: rows leave the
  batch, or static: a fixed-shape cache and a CUDA-graph step, capture included in the time),
  ``hf_eager`` (``generate``, dynamic cache) and ``hf_static_compile`` (``generate`` with
  ``cache_implementation="static"``, which transformers compiles with mode reduce-overhead on
  CUDA; ``compiled: false`` on the CPU, where it is not compiled). Median of ``reps`` timed
  calls after a warm-up call (the warm-up holds transformers' compilation).
- ``kind: grpo_step``: one GRPO step (recipes/grpo_arith.yaml with the shape's sizes) through
  the trainer's own phases, each phase's time and peak memory (the step's models are built once
  and saved to a temporary checkpoint, which the trainer loads); ``variant`` names the recipe
  overrides (``--variant NAME:key=value,key=value``; default ``lora``: the recipe as it is).
  Full fine-tuning and micro-batches are variants, e.g. ``--variant full:lora_r=0``,
  ``--variant mb8:micro_batch_size=8``, once those keys exist.

Order: generation at grpo_arith's shape, then at the long one, for ``rlhf`` (static, dynamic) and
``hf_eager``; the GRPO steps; then ``hf_static_compile`` (transformers compiles per model and
shape: the run's longest part, so it comes last). What would start after ``--budget-s``
(default 390 s) is written as skipped, so the run ends within ~8 min on an H100; rerun what was
skipped with ``--only``, ``--models``, ``--engines``.

Keys of every measurement: card, model, rows, new_tokens, engine, tokens_per_s, step_s (the
rollout's seconds for generation, the whole step's for grpo_step), peak_mem_gb (1e9 bytes,
``torch.cuda.max_memory_allocated`` over the measurement; None on the CPU), mfu (the math's
FLOPs, counted as benchmarks/gpu_check.py's ``phase_flops`` does, over seconds x the measured
bf16 matmul peak). A measurement that fails (out of memory, a capture refused) is a line with
``error``; one skipped because the run passed ``--budget-s`` is a line with ``skipped``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from gpu_check import ABSENT_THERE, SMOLLM2, matmul_peak, model_sizes, phase_flops, sync  # noqa: E402

# the architectures (config.json of each model; weights here are random)
QWEN25 = dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
              tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu", initializer_range=0.02,
              bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)
MODELS = {
    "SmolLM2-135M": ("llama", SMOLLM2),
    "Qwen2.5-0.5B": ("qwen2", dict(QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2)),
    "Qwen2.5-1.5B": ("qwen2", dict(QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2)),
}
QUICK_MODELS = {  # the same code paths on shapes a CPU test runs in seconds
    "tiny-llama": ("llama", dict(SMOLLM2, num_hidden_layers=2, vocab_size=4096)),
    "tiny-qwen2": ("qwen2", dict(QWEN25, vocab_size=4096, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=2)),
}
# (prompts, completions per prompt, prompt tokens, new tokens)
SHAPES = {"grpo_arith": (8, 8, 46, 24), "long": (16, 8, 128, 512)}
QUICK_SHAPES = {"grpo_arith": (2, 2, 8, 4), "long": (2, 2, 8, 12)}
ENGINES = ("rlhf:static", "rlhf:dynamic", "hf_eager", "hf_static_compile")
STEP_MODELS = {"SmolLM2-135M": "grpo_arith", "Qwen2.5-0.5B": "long", "Qwen2.5-1.5B": "long"}  # the step's shape
LONG_STEP_SETS = ["gradient_checkpointing=true"]  # 128 rows x 640 tokens: activations dominate


class Out:
    """The JSONL file: one line per measurement, with the run's constant fields."""

    def __init__(self, path: Path, const: dict):
        self.path, self.const = path, const
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, **fields) -> None:
        line = json.dumps({**self.const, **fields})
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|h20|a100|a10g|l40s|l4|b200|gh200)", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def build_model(kind: str, arch: dict, device: torch.device, dtype: torch.dtype):
    """A causal LM of ``arch`` with random weights, in ``dtype`` on ``device``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    with device:
        model = model_cls(cfg_cls(**arch)).to(dtype)
    return model.eval()


def save_checkpoint(model, path: Path) -> str:
    from rlhf.testing import tiny_tokenizer

    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def prompts(p: int, lp: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (p, lp), generator=torch.Generator().manual_seed(0)).to(device)
    return ids, torch.ones_like(ids)


def generation_fn(engine: str, model, ids, mask, g: int, new: int):
    """A no-argument call that writes one rollout with ``engine``; its ``compiled`` flag."""
    from rlhf.core.logprobs import Truncation
    from rlhf.lm.sampler import DecodeSettings, decode
    from rlhf.lm.static_decode import decode_static

    if engine.startswith("rlhf"):
        s = DecodeSettings(1.0, Truncation(), (-1,), 0)  # no token ends a row
        u = torch.rand(ids.shape[0] * g, new, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        fn = decode if engine == "rlhf:dynamic" else decode_static
        return (lambda: fn(model, ids, mask, g, new, s, uniforms=u)), False
    rows, rmask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)  # as TRL hands it the prompts
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
              pad_token_id=0)
    compiled = False
    if engine == "hf_static_compile":
        compiled = ids.device.type == "cuda"
        kw.update(cache_implementation="static", disable_compile=not compiled)
    return (lambda: model.generate(input_ids=rows, attention_mask=rmask, **kw)), compiled


def timed(fn, device, reps: int) -> tuple[list[float], float | None]:
    """Seconds of ``reps`` calls after one warm-up, and the peak memory (GB) over the timed ones."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        sync(device)
        secs.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return secs, peak


def measure_generation(ctx, name: str, model, arch: dict, shape: str, engines: list[str]) -> None:
    p, g, lp, new = ctx.shapes[shape]
    ids, mask = prompts(p, lp, arch["vocab_size"], ctx.device)
    flops = phase_flops(model_sizes(arch, 0), p, lp, [new] * (p * g))["generation"]
    for engine in engines:
        base = dict(kind="generation", model=name, shape=shape, rows=p * g, prompt_tokens=lp, new_tokens=new,
                    engine=engine.split(":")[0], decode=engine.split(":")[1] if ":" in engine else None)
        if ctx.over_budget():
            ctx.out.add(**base, skipped=f"past --budget-s {ctx.budget_s}")
            continue
        try:
            fn, compiled = generation_fn(engine, model, ids, mask, g, new)
            secs, peak = timed(fn, ctx.device, ctx.reps if new < 100 else 1)
        except Exception as exc:  # one engine's failure (OOM, a refused capture) must not hide the rest
            ctx.fail(base, exc)
            continue
        sec = statistics.median(secs)
        ctx.out.add(**base, compiled=compiled, tokens_per_s=round(p * g * new / sec, 1), step_s=round(sec, 4),
                    seconds=[round(x, 4) for x in secs], peak_mem_gb=peak and round(peak, 2),
                    mfu=round(flops / sec / ctx.peak, 5))


def measure_step(ctx, name: str, path: str, arch: dict, shape: str, variant: str, sets: list[str]) -> None:
    """One GRPO step after a warm-up step, through the trainer's phases, each with its peak memory."""
    from rlhf.config import load_recipe
    from rlhf.distributed import Dist
    from rlhf.lm.rollout import rollout_pass, sampling_uniforms
    from rlhf.lm.sampler import decode
    from rlhf.lm.static_decode import decode_engine
    from rlhf.trainers.lm import Baseline, advantages, build, update

    p, g, lp, new = ctx.shapes[shape]
    sets = (LONG_STEP_SETS if shape == "long" else []) + sets
    base = dict(kind="grpo_step", model=name, shape=shape, rows=p * g, prompt_tokens=lp, new_tokens=new,
                engine="rlhf", variant=variant, overrides=sets)
    if ctx.over_budget():
        return ctx.out.add(**base, skipped=f"past --budget-s {ctx.budget_s}")
    try:
        cfg = load_recipe(str(ROOT / "recipes" / "grpo_arith.yaml"),
                          [f"model={path}", f"dtype={ctx.dtype}", "save_every=0", f"prompts_per_step={p}",
                           f"group_size={g}", f"max_new_tokens={new}", *sets])
        dist = Dist()
        policy, opt, sched = build(cfg, dist)
        ids, mask = prompts(p, lp, arch["vocab_size"], policy.device)
        policy.eos_ids = [-1]  # random weights: every row runs the full budget, as in the generation lines
        for step in range(2):  # the first warms up (kernels, allocator, graph capture)
            times, peaks = {}, {}
            for phase in ("generation", "reference", "update"):
                ctx.phase_start()
                t = time.perf_counter()
                if phase == "generation":
                    with dist.autocast():
                        u = sampling_uniforms(cfg.seed, range(p), g, new)
                        roll = policy.generate(ids, mask, g, new, uniforms=u)
                elif phase == "reference":
                    with dist.autocast():
                        passes = rollout_pass(policy, roll, cfg)
                else:
                    rewards = torch.randn(len(roll), generator=torch.Generator().manual_seed(step)).to(policy.device)
                    adv, ret, _ = advantages(rewards, roll, passes, cfg, Baseline(), dist)
                    stats, _ = update(policy, opt, sched, roll, adv, ret, passes, cfg, dist)
                sync(ctx.device)
                times[phase], peaks[phase] = time.perf_counter() - t, ctx.phase_peak()
        lengths = [int(x) for x in roll.mask.sum(1).tolist()]
        flops = phase_flops(model_sizes(arch, cfg.lora_r), p, lp, lengths)
        step_s = sum(times.values())
        resolved = "dynamic" if decode_engine(policy.decode_mode, policy.device) is decode else "static"
        ctx.out.add(**base, decode=resolved, tokens_per_s=round(sum(lengths) / step_s, 1),
                    step_s=round(step_s, 4), peak_mem_gb=max(peaks.values()) if ctx.device.type == "cuda" else None,
                    mfu=round(sum(flops.values()) / step_s / ctx.peak, 5),
                    phases={k: {"s": round(times[k], 4), "peak_mem_gb": peaks[k],
                                "mfu": round(flops[k] / times[k] / ctx.peak, 5)} for k in times},
                    loss=float(stats["loss"]))
    except Exception as exc:
        ctx.fail(base, exc)
    finally:
        policy = opt = roll = passes = None
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


class Context:
    def __init__(self, args):
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.dtype = args.dtype
        self.models = {k: v for k, v in (QUICK_MODELS if args.quick else MODELS).items()
                       if not args.models or k in args.models}
        self.shapes = QUICK_SHAPES if args.quick else SHAPES
        self.step_models = {k: "grpo_arith" if k == "tiny-llama" else "long" for k in QUICK_MODELS} \
            if args.quick else STEP_MODELS
        self.engines = args.engines or ENGINES
        self.reps, self.budget_s, self.t0 = (2 if args.quick else 3), args.budget_s, time.time()
        self.peak = matmul_peak(self.device, getattr(torch, args.dtype), 512 if args.quick else 8192,
                                3 if args.quick else 10)
        self.out = Out(Path(args.out) / f"gpu_scale_{card_name(self.device)}.jsonl", environment(self))

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.budget_s

    def fail(self, base: dict, exc: Exception) -> None:
        self.out.add(**base, error=f"{type(exc).__name__}: {exc}"[:500],
                     traceback=traceback.format_exc().strip().splitlines()[-4:])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def phase_start(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def phase_peak(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2) if self.device.type == "cuda" else None


def environment(ctx) -> dict:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"card": card_name(ctx.device), "device": torch.cuda.get_device_name(ctx.device)
            if ctx.device.type == "cuda" else "cpu", "dtype": ctx.dtype, "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit.stdout.strip() or None,
            "matmul_peak_tflops": round(ctx.peak / 1e12, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (with --quick: the test)")
    ap.add_argument("--quick", action="store_true", help="tiny models and shapes")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default=str(ROOT / "docs" / "data"), help="directory of gpu_scale_<card>.jsonl")
    ap.add_argument("--models", nargs="*", help=f"a subset of {', '.join(MODELS)}")
    ap.add_argument("--engines", nargs="*", choices=ENGINES, help="a subset of the generation engines")
    ap.add_argument("--only", choices=["generation", "step"], help="one kind of measurement")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,key=value recipe overrides of the GRPO step (default: lora:)")
    ap.add_argument("--budget-s", type=float, default=390.0, help="skip (and say so) what would start after this")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device here; run with --cpu --quick on a CPU"}), flush=True)
        return 2
    if args.cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    variants = [(v.split(":", 1)[0], [x for x in v.split(":", 1)[1].split(",") if x])
                for v in (args.variant or ["lora:"])]
    ctx = Context(args)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_scale_"))
    dtype = getattr(torch, args.dtype)
    models = {name: build_model(kind, arch, ctx.device, dtype) for name, (kind, arch) in ctx.models.items()}
    fast = [e for e in ctx.engines if e != "hf_static_compile"]
    slow = [e for e in ctx.engines if e == "hf_static_compile"]  # compiles per model and shape: last
    order = [("generation", "grpo_arith", fast), ("generation", "long", fast), ("step", None, None),
             ("generation", "grpo_arith", slow), ("generation", "long", slow)]
    for what, shape, engines in order:
        if (args.only and args.only != what) or engines == []:
            continue
        for name, (kind, arch) in ctx.models.items():
            if what == "generation":
                measure_generation(ctx, name, models[name], arch, shape, engines)
            elif name in ctx.step_models:
                path = save_checkpoint(models[name], tmp / name)
                for vname, sets in variants:
                    measure_step(ctx, name, path, arch, ctx.step_models[name], vname, sets)
    loaded = sorted(m for m in ABSENT_THERE if m in sys.modules)
    ctx.out.add(kind="done", seconds=round(time.time() - ctx.t0, 1), absent_modules_loaded=loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
