"""Input checks that run before a model loads or a run directory is written.

Three classes of checks, each failure one ``UserError`` sentence naming the key or file, the
bad value and what would be valid:

1. **Ranges** (``check_ranges``, run by ``rlhf.config.build`` for every family): every numeric
   key of every recipe family has an entry in ``RANGES``; a test keeps the table complete.
   Bounds are where a setting stops having a meaning (a probability, a discount, a count, a
   positive step size), not taste: ``lr`` has no upper bound because nothing breaks above one.
2. **Model directory** (``rlhf.preflight.check_model_dir``): ``config.json``, safetensors weights (the project
   loads no pickles: a ``.bin``-only checkpoint is refused with how to convert it), every shard
   an index names, and tokenizer files.
3. **Data** (``rlhf.preflight.check_rows``): a dataset is non-empty, its prompts are text or chat messages,
   it has the columns each reward function names in its signature (a reward without
   ``**kwargs`` is given only those), and every prompt plus ``max_new_tokens`` fits the
   model's context window (and ``max_prompt_length`` where a family has that key).

``rlhf.preflight.preflight(cfg)`` runs 2 and 3 (gym: the env) and is called by the CLI before the run
directory is created, so a run that cannot start leaves nothing behind. Rows are counted
from 1 in messages (row 1: the first data row of a file).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rlhf.errors import UserError


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``*_open``: strict); ``None``: unbounded; ``also``: single
    values allowed outside the interval (``gradient_steps: -1`` means "as many as env steps")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()

    def holds(self, v) -> bool:
        if v in self.also:
            return True
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def __str__(self) -> str:
        low, high = _num(self.low), _num(self.high)
        if self.low is None and self.high is None:
            text = "a finite number"
        elif self.high is None:
            text = f"{'>' if self.low_open else '>='} {low}"
        elif self.low is None:
            text = f"{'<' if self.high_open else '<='} {high}"
        else:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return text + "".join(f" or {a}" for a in self.also)


def _num(x) -> str:
    return "" if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}"


ANY = Range()                                        # any finite number
POSITIVE = Range(0, low_open=True)                   # > 0
NON_NEGATIVE = Range(0)                              # >= 0
AT_LEAST_1 = Range(1)                                # counts
UNIT = Range(0, 1)                                   # probabilities, discounts, fractions
FRACTION_OPEN = Range(0, 1, low_open=True, high_open=True)
SEED = Range(0, 2**32 - 1)                           # numpy's and gymnasium's seed range

# family (config class name) -> numeric key -> range. A key whose value is None (an optional
# setting left unset) is not checked.
RANGES: dict[str, dict[str, Range]] = {
    "LMConfig": {
        "seed": SEED, "steps": AT_LEAST_1, "prompts_per_step": AT_LEAST_1, "group_size": AT_LEAST_1,
        "max_new_tokens": AT_LEAST_1, "temperature": POSITIVE, "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
        "epochs": AT_LEAST_1, "minibatches": AT_LEAST_1, "kl_coef": NON_NEGATIVE, "vf_coef": NON_NEGATIVE,
        "clip_range_value": POSITIVE, "gamma": UNIT, "gae_lambda": UNIT, "penalty_coef": NON_NEGATIVE,
        "target_kl": POSITIVE,
        "clip_range": FRACTION_OPEN,    # the ratio is clipped below at 1 - clip_range, which must stay > 0
        "clip_range_high": POSITIVE, "rm_beta": NON_NEGATIVE,
        "lora_r": NON_NEGATIVE,                                                 # 0: full fine-tuning
        "micro_batch_size": NON_NEGATIVE,                                       # 0: the whole minibatch
        "tis_cap": Range(1),                                                    # a weight of 1 survives it
        "lora_alpha": AT_LEAST_1, "lora_alpha": AT_LEAST_1,
        "lora_dropout": Range(0, 1, high_open=True), "threads": NON_NEGATIVE,
        "eval_problems": AT_LEAST_1, "eval_seed": SEED, "eval_batch": AT_LEAST_1,
        "save_every": NON_NEGATIVE, "max_nonfinite_steps": AT_LEAST_1, "keep_checkpoints": AT_LEAST_1,
        "reward_timeout_s": NON_NEGATIVE, "reward_workers": NON_NEGATIVE,   # 0 turns each off
        "top_k": NON_NEGATIVE, "min_p": UNIT, "max_prompt_length": NON_NEGATIVE,  # 0 turns each off
        "top_p": Range(0, 1, low_open=True),                                    # 1 turns it off
        "log_completions_every": NON_NEGATIVE,                                  # 0 turns it off
    },
    "AgentConfig": {},  # LMConfig's and the agent keys (below)
    "GymConfig": {
        "seed": SEED, "total_steps": AT_LEAST_1, "n_envs": AT_LEAST_1, "threads": AT_LEAST_1,
        "gamma": UNIT, "lr": POSITIVE, "hidden": AT_LEAST_1, "layers": AT_LEAST_1,
        "max_grad_norm": NON_NEGATIVE, "clip_obs": POSITIVE, "n_steps": AT_LEAST_1,
        "gae_lambda": UNIT, "epochs": AT_LEAST_1, "minibatches": AT_LEAST_1,
        "clip_range": FRACTION_OPEN, "clip_range_value": POSITIVE, "penalty_coef": NON_NEGATIVE,
        "target_kl": POSITIVE, "ent_coef": NON_NEGATIVE, "vf_coef": NON_NEGATIVE,
        "log_std_init": ANY, "cg_iters": AT_LEAST_1, "cg_damping": NON_NEGATIVE,
        "line_search_steps": AT_LEAST_1, "critic_updates": AT_LEAST_1, "buffer_size": AT_LEAST_1,
        "batch_size": AT_LEAST_1, "learning_starts": NON_NEGATIVE, "train_freq": AT_LEAST_1,
        "gradient_steps": Range(1, also=(-1,)), "target_update": AT_LEAST_1,
        "tau": Range(0, 1, low_open=True),  # 0 would never move the target critics
        "eps_start": UNIT, "eps_end": UNIT, "eps_fraction": UNIT, "alpha": POSITIVE,
        "target_entropy": ANY, "alpha_q": Range(0, 1, low_open=True),
        "eps_decay_episodes": AT_LEAST_1, "log_every": AT_LEAST_1, "select_every": NON_NEGATIVE,
        "select_episodes": AT_LEAST_1, "eval_episodes": AT_LEAST_1, "eval_seed": SEED,
        "save_every": NON_NEGATIVE, "keep_checkpoints": AT_LEAST_1,
    },
}

RANGES["AgentConfig"] = {**RANGES["LMConfig"], "max_turns": AT_LEAST_1, "max_episode_tokens": Range(2),
                         "invalid_penalty": ANY}


# ---------------------------------------------------------------------------------- 1. ranges
def check_ranges(cfg) -> None:
    """Every numeric key of ``cfg`` is finite and inside its family's range."""
    table = RANGES.get(type(cfg).__name__, {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or f.name not in table:
            continue
        rng = table[f.name]
        if not math.isfinite(value) or not rng.holds(value):
            raise UserError(f"{f.name} must be {rng} (got {value!r}); set it in the recipe or with "
                            f"--set {f.name}=VALUE")
