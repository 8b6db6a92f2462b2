"""A/B of one sampling change on the same rollout: the recipe's first step's prompts and random
numbers, one process, the two variants interleaved, process CPU seconds per rollout (what a
shared machine does not inflate), completion tokens and the summed log-prob (equal when the
samples are).

    python benchmarks/sampling_ab.py merge        # adapter folded into the weights vs not
    python benchmarks/sampling_ab.py compaction   # KV rows gathered into a spare buffer (a candidate) vs fresh ones
    [--pairs 3] [--threads 1] [--set key=value ...]

``merge`` sets the adapter's B to N(0, 1e-3) first (at init B = 0 and merging has nothing to fold).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _spare_buffer(self, indices):
    """A candidate compaction for the decode cache (``compaction on``): gather the kept rows into
    a second buffer allocated once, the two swapping, instead of freshly allocated ones (the
    code's, ``off``). Alone it is ~2.5x cheaper; on a whole rollout it did not beat the noise
    of a shared machine (docs/speed.md), so the code keeps the plain gather."""
    spare = getattr(self, "_spare", None) or (torch.empty_like(self.kbuf), torch.empty_like(self.vbuf))
    self._spare = (self.kbuf, self.vbuf)
    self.kbuf = torch.index_select(self.kbuf, 0, indices, out=spare[0][:len(indices)])
    self.vbuf = torch.index_select(self.vbuf, 0, indices, out=spare[1][:len(indices)])
    self._views()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("change", choices=("merge", "compaction"))
    ap.add_argument("--recipe", default="grpo_arith")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    import rlhf.lm.kv_cache as kv
    from rlhf.catalog import find_recipe
    from rlhf.config import load_recipe
    from rlhf.distributed import Dist
    from rlhf.lm.rollout import collect
    from rlhf.seeding import seed_everything
    from rlhf.tasks import task_from_config
    from rlhf.trainers.lm import build, rank_uniforms

    cfg = load_recipe(find_recipe(args.recipe), [f"threads={args.threads}", "save_every=0", *args.overrides])
    dist = Dist()
    seed_everything(cfg.seed, cfg.threads)
    policy, _, _ = build(cfg, dist)
    rows_iter = task_from_config(cfg).train_rows()
    rows = [next(rows_iter) for _ in range(cfg.prompts_per_step)]
    uniforms = rank_uniforms(cfg, 0, dist)
    plain_select = kv.InPlaceLayer.batch_select_indices
    if args.change == "merge":
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)

    def variant(on: bool) -> None:
        if args.change == "merge":
            policy.merge_for_sampling = on
        else:
            kv.InPlaceLayer.batch_select_indices = _spare_buffer if on else plain_select

    def rollout(on: bool) -> tuple[float, int, float]:
        variant(on)
        c = time.process_time()
        roll, *_ = collect(policy, rows, cfg, uniforms=uniforms)
        return time.process_time() - c, int(roll.mask.sum()), float(roll.rollout_logp.sum())

    rollout(True), rollout(False)  # warm-up: allocations, first-call kernel choices
    times = {True: [], False: []}
    for _ in range(args.pairs):
        for on in (True, False):
            s, tokens, logp = rollout(on)
            times[on].append(s)
            print(f"{args.change} {'on ' if on else 'off'}: {s:.2f} CPU s, {tokens} tokens, sum logp {logp:.3f}",
                  flush=True)
    ratios = [a / b for a, b in zip(times[True], times[False])]
    print(f"median on {statistics.median(times[True]):.2f} s, off {statistics.median(times[False]):.2f} s; "
          f"pairwise on/off {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
