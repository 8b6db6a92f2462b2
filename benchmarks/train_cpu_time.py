"""`rlhf train` from a source tree with the trainer's phase timers reading this process's CPU
time instead of the wall clock, so the per-phase figures in metrics.jsonl (time/generate_s,
time/ref_s, time/update_s) are not inflated by other processes on a shared machine. Works
for older checkouts too (it only replaces the ``time`` module the trainer's timers read).

    git archive COMMIT | tar -x -C /tmp/old
    python benchmarks/train_cpu_time.py /tmp/old train recipes/grpo_arith.yaml --set steps=2 --set threads=1
    python benchmarks/train_cpu_time.py . train recipes/grpo_arith.yaml --set steps=2 --set threads=1

Run the two in turn (A B A B) and compare the phases step by step (the same seed gives the
same samples: completion_len and reward match).
"""
import os
import sys
import time
import types

src = os.path.abspath(sys.argv[1])
sys.path.insert(0, src)
os.chdir(src)
import rlhf.trainers.lm as trainer  # noqa: E402

cpu_clock = types.SimpleNamespace(time=time.process_time)
trainer.time = cpu_clock
try:  # the rollout pass's own timer (newer layouts)
    import rlhf.lm.rollout as rollout  # noqa: E402
    rollout.time = cpu_clock
except ImportError:
    pass
from rlhf.cli import main  # noqa: E402

assert trainer.__file__.startswith(src), trainer.__file__
sys.exit(main(sys.argv[2:]))
