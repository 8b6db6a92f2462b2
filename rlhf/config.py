"""Typed recipe configs, and a recipe's values turned into one. A recipe is YAML that only
overrides these defaults.

    rlhf train recipes/grpo_arith.yaml --set lr=1e-4 --set steps=50

Each key is documented once, by the comment on its field (``LMConfig`` below, ``GymConfig`` in
rlhf/gym/config.py). A concept both families have has one name in both, chosen for what a
TRL / CleanRL / SB3 user already knows. From a recipe to a config:

    rlhf/recipe_yaml.py     the YAML file and ``--set key=value`` -> a key: value mapping
    config_class (here)     the family (LM or gym) whose algo and keys the mapping names
    rlhf/renamed_keys.py    old keys -> their new keys, one logged line each (the concept/name table)
    rlhf/toolkit_names.py   unknown keys, all in one error; TRL / SB3 / CleanRL names answered
    build (here)            each value typed as its field, then rlhf/validation.py's ranges and
                            the family's own checks (``validate``; the KL pairs: rlhf/kl_placement.py)
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from rlhf.agents.config import AgentKeys
from rlhf.core import ADV_ESTIMATORS, POLICY_OBJECTIVES
from rlhf.errors import UserError, check_choices
from rlhf.gym.config import GymConfig
from rlhf.hub import check_repo_id
from rlhf.kl_placement import DEFAULT_KL_ESTIMATOR, KL_REFUSED
from rlhf.recipe_yaml import apply_overrides, read_recipe, read_run_recipe
from rlhf.renamed_keys import RENAMED, rename_deprecated
from rlhf.toolkit_names import unknown_keys_message, value_note
from rlhf.tracking import tracker_names
from rlhf.validation import check_ranges

__all__ = ["LMConfig", "AgentConfig", "CONFIGS", "KL_REFUSED", "DEFAULT_KL_ESTIMATOR", "load_recipe", "read_recipe",
           "config_class", "build", "to_dict", "load_run_config"]


@dataclass
class LMConfig:
    """Token-level RL on a causal LM with a LoRA adapter (GRPO; REINFORCE/RLOO by settings)."""

    algo: str = "grpo"                   # grpo | rloo | reinforce | ppo (value head + token GAE)
                                         # | reward_model (Bradley-Terry on preference pairs)
    adv_estimator: str | None = None     # advantage estimator, a name in rlhf.core.ADV_ESTIMATORS (verl's key).
                                         # None: the algo's own, grpo -> grpo (group-normalised), rloo -> rloo
                                         # (leave-one-out), reinforce -> reinforce (moving-average baseline),
                                         # ppo -> gae (token GAE from the value head; gae needs algo ppo)
    model: str = "SmolLM2-135M-Instruct" # alias, Hub id, or local HF checkpoint directory
    revision: str | None = None          # Hub branch, tag or commit of model (None: main; pinned: no GGUF fallback)
    task: str = "arith"                  # "arith" (generated), a .jsonl/.json/.csv/.parquet file, a dataset
                                         # directory (save_to_disk, or data files + README.md), or a Hub id
    task_config: str | None = None       # the dataset's config name (load_dataset's name=; gsm8k: main)
    task_split: str = "train"            # split to train on (a single file's only split is train)
    eval_task: str | None = None         # held-out dataset, same forms as task (default: 10% of task's rows)
    eval_split: str | None = None        # held-out split of eval_task, or of task when eval_task is unset
                                         # (e.g. test; default: task_split for eval_task, else the 10% split)
    columns: dict = field(default_factory=dict)  # our column: the dataset's, e.g. {prompt: question}; answer
                                         # and reward columns too (rewards get columns by our names)
    prompt_template: str | None = None   # str.format over a row's columns, e.g. "{question}\nThink first."
    system_prompt: str | None = None     # system message before each prompt (makes text prompts chats)
    chat: bool = False                   # send text prompts as a user message through the chat template
    chat_template_kwargs: dict = field(default_factory=dict)  # extra apply_chat_template arguments,
                                         # e.g. {enable_thinking: false} for Qwen3
    max_prompt_length: int = 0           # keep the last N prompt tokens (0: all); the count cut is logged
    rewards: list = field(default_factory=lambda: ["arith_correct"])  # names or {name: weight}
    reward_timeout_s: float = 0.0        # >0: a sample taking longer in one reward function scores None for
                                         # it, with one line naming both, and the run goes on (0: no limit)
    reward_workers: int = 0              # processes scoring rewards one sample per call (0: in-process,
                                         # batched; a timeout uses >= 1 since only a process can be stopped)
    seed: int = 0                        # seeds data, sampling and LoRA init
    steps: int = 30                      # optimiser steps (one rollout each)
    prompts_per_step: int = 4            # distinct prompts per rollout
    group_size: int = 8                  # completions sampled per prompt (GRPO needs >= 2)
    max_new_tokens: int = 24             # completion length cap
    temperature: float = 1.0             # sampling temperature (log-probs use it too)
    top_k: int = 0                       # sample among the k most likely tokens (0: all)
    top_p: float = 1.0                   # then the fewest most likely tokens whose probability sums to >= top_p
    min_p: float = 0.0                   # then drop tokens less likely than min_p x the most likely one.
                                         # Log-probs, ratios and KL use this truncated distribution,
                                         # renormalised (the reference: its full one, so KL stays finite)
    stop: list = field(default_factory=list)  # stop strings: a completion ends with (includes) the first
                                         # one; tokens after the one that completes it are masked
    lr: float = 2e-4                     # AdamW learning rate of the adapter
    weight_decay: float = 0.0            # AdamW weight decay
    warmup_steps: int = 0                # linear LR warm-up, then constant
    max_grad_norm: float = 1.0           # gradient clipping (0 disables)
    epochs: int = 1                      # update epochs per rollout (>1 needs a ratio objective: not reinforce)
    minibatches: int = 1                 # optimiser steps per epoch, each on whole groups of the rollout
    micro_batch_size: int = 0            # rows (completions) per forward/backward; an optimiser step accumulates
                                         # its minibatch's micro-batches, normalised by the whole minibatch (all
                                         # processes): the same gradient, peak memory ~ this (0: the whole minibatch)
    kl_coef: float = 0.04                # KL(pi || ref) coefficient; 0 skips the reference pass (TRL's beta)
    kl_estimator: str | None = None      # k1 | k2 | k3 | k3+ (None: k3+ in the loss, k1 in the reward).
                                         # Gradients: loss k2, k3+ -> KL(pi||ref); loss k3 -> KL(ref||pi)
                                         # (GRPO paper); reward k1 -> KL(pi||ref). Other pairs are
                                         # refused (rlhf/kl_placement.py; rlhf.core.objectives.kl_estimate)
    kl_placement: str = "loss"           # loss: kl_coef * KL term in the loss (GRPO); reward: -kl_coef * KL
                                         # folded into the reward (InstructGPT; per token for ppo)
    critic: str = "shared"               # ppo: shared (value head on the policy's LoRA trunk) | separate
                                         # (its own LoRA adapter on a second copy of the base model)
    vf_coef: float = 0.1                 # ppo: weight of the value loss
    clip_range_value: float | None = 0.2 # ppo: clip value updates to +-this around the rollout's values
    gamma: float = 1.0                   # ppo: discount over tokens
    gae_lambda: float = 0.95             # ppo: GAE lambda
    norm_adv: bool = True                # ppo: whiten token advantages over the batch
    objective: str | None = None         # a name in rlhf.core.POLICY_OBJECTIVES. surrogate (PPO paper): clip |
                                         # kl_penalty (fixed penalty_coef) | adaptive_kl (penalty_coef halves/
                                         # doubles around target_kl) | none (unclipped ratio); all but clip need
                                         # epochs x minibatches > 1 (one step: ratio 1). reinforce: plain
                                         # REINFORCE (one step). None: reinforce for algo reinforce, else clip
    penalty_coef: float = 1.0            # kl_penalty / adaptive_kl: (initial) coefficient of KL(pi_old || pi)
    target_kl: float = 0.01              # adaptive_kl: the KL(pi_old || pi) per token after the update that
                                         # the controller steers to (logged: kl_after_update)
    clip_range: float = 0.2              # PPO clip epsilon: the ratio is clipped below at 1 - clip_range
    clip_range_high: float | None = None # epsilon above 1 (None: = clip_range; DAPO uses 0.28)
    agg: str = "token_mean"              # token_mean | seq_mean | constant (Dr. GRPO)
    scale_rewards: str = "group"         # group | batch | none (std used in group advantages)
    mask_truncated: bool = False         # drop completions that hit max_new_tokens from the loss
    lora_r: int = 16                     # LoRA rank; 0: full fine-tuning (every weight trains, fp32 master
                                         # weights, a frozen copy is the reference; none when kl_coef is 0)
    lora_alpha: int = 32                 # LoRA alpha (scale = alpha / r)
    lora_dropout: float = 0.0            # LoRA dropout (acts only with disable_dropout: false)
    lora_targets: str | list = "all-linear"  # peft target_modules
    dtype: str = "float32"               # base model weights: float32 | bfloat16 | float16 | auto (bf16 where
                                         # this machine runs it faster); LoRA, log-probs and loss stay fp32;
                                         # float16 (GPUs without bf16) trains with a loss scaler; lora_r 0 keeps
                                         # fp32 master weights and computes in this dtype by autocast
    tis: str = "auto"                    # truncated importance sampling of the sampler's log-probs against the
                                         # trainer's: token | sequence | none | auto (token where dtype resolves to
                                         # bfloat16 or float16, none in float32); weights the policy-gradient term
    tis_cap: float = 2.0                 # the weight's cap: min(pi_old / pi_sampler, tis_cap) (verl's token-TIS)
    decode: str = "auto"                 # sampler: dynamic (rows that end leave the batch) | static (a fixed-shape
                                         # KV cache, the step a CUDA graph on CUDA) | auto (static on CUDA, dynamic
                                         # on the CPU: docs/speed.md, "The decode path")
    disable_dropout: bool = True         # no dropout in any phase, update included (ratio 1 on-policy, as TRL)
    gradient_checkpointing: bool = False # recompute activations in backward: less memory, more time
    threads: int = 0                     # torch intra-op threads (0: torch's default)
    rm_head: str = "log_ratio"           # reward_model: log_ratio (rm_beta * sum of log p_rm - log p_base over
                                         # the completion) | classifier (score head on the last token)
    rm_beta: float = 0.04                # reward_model, rm_head log_ratio: scale of the reward (DPO's beta)
    eval_problems: int = 200             # held-out prompts scored by `rlhf eval`
    eval_seed: int = 12345               # seed of the held-out prompts
    eval_batch: int = 50                 # prompts per greedy generation batch in eval
    debug_tensors: bool = False          # write each step's rewards, advantages and loss per process
                                         # to RUN_DIR/debug/ (to check multi-process numerics)
    save_every: int = 10                 # write the adapter every N steps (0: only at the end)
    max_nonfinite_steps: int = 3         # stop after this many non-finite losses in a row
    keep_checkpoints: int = 2            # complete checkpoints kept (the newest and older ones to fall back on
                                         # when the newest is unreadable); >= 1
    report_to: str | list = "none"       # trackers beside metrics.jsonl: tensorboard | wandb | trackio | mlflow,
                                         # one or a list (none: no tracker); rlhf/tracking.py says where each writes
    log_completions_every: int = 10      # write sampled completions (prompt, completion, rewards, advantage)
                                         # to completions.jsonl every N steps, the first and last too (0: never)
    push_to_hub: str | None = None       # Hub model repo (user/name): adapter/ is uploaded there when the run
                                         # ends (token: HF_TOKEN or hf auth login); later: rlhf push RUN_DIR REPO
    hub_private: bool = False            # push_to_hub creates the repo private (an existing repo keeps its setting)
    out_dir: str = "runs"                # where run directories are created
    run_name: str | None = None          # run directory name (default: recipe name + time)

    choices = {
        "algo": ("grpo", "rloo", "reinforce", "ppo", "reward_model"),
        "kl_estimator": ("k1", "k2", "k3", "k3+"),
        "kl_placement": ("loss", "reward"),
        "adv_estimator": ADV_ESTIMATORS,  # registries: an estimator or objective registered in code is valid
        "objective": POLICY_OBJECTIVES,
        "critic": ("shared", "separate"),
        "agg": ("token_mean", "seq_mean", "constant"),
        "scale_rewards": ("group", "batch", "none"),
        "dtype": ("auto", "float32", "bfloat16", "float16"),
        "tis": ("auto", "token", "sequence", "none"),
        "decode": ("auto", "dynamic", "static"),
        "rm_head": ("log_ratio", "classifier"),
    }

    def __post_init__(self) -> None:
        if self.kl_estimator is None:  # the placement's default, written into the resolved recipe
            self.kl_estimator = DEFAULT_KL_ESTIMATOR.get(self.kl_placement)
        if self.adv_estimator is None:  # the algo's own (written into the resolved recipe)
            self.adv_estimator = DEFAULT_ADV_ESTIMATOR.get(self.algo)
        if self.objective is None or (self.algo == "reinforce" and self.objective == "clip"):
            # (recipes resolved before objective 'reinforce' existed wrote clip for algo reinforce)
            self.objective = "reinforce" if self.algo == "reinforce" else "clip"

    def validate(self) -> None:
        # numeric ranges are checked first, in one place for every family: rlhf/validation.py (RANGES)
        check_choices(self)
        refused = KL_REFUSED.get((self.kl_estimator, self.kl_placement))
        if refused:
            raise UserError(f"kl_estimator={self.kl_estimator} with kl_placement={self.kl_placement}: {refused}")
        if self.adv_estimator in ("grpo", "rloo") and self.group_size < 2:
            raise UserError(f"{self.adv_estimator} needs group_size >= 2 (got {self.group_size}): its baseline is "
                            "the other completions of the same prompt; use algo: reinforce for 1")
        if (self.adv_estimator == "gae") != (self.algo == "ppo") and self.algo != "reward_model":
            raise UserError(f"adv_estimator {self.adv_estimator} with algo {self.algo}: gae reads the value head "
                            "that only algo ppo has, and ppo's value head learns gae's returns; pair gae with "
                            "algo ppo only, or remove adv_estimator from the recipe")
        if self.prompts_per_step % self.minibatches:
            raise UserError(f"minibatches={self.minibatches} must divide prompts_per_step="
                            f"{self.prompts_per_step} (a minibatch holds whole groups)")
        if self.algo == "reinforce" and self.objective != "reinforce":
            raise UserError(f"objective {self.objective!r} is a ratio surrogate; algo reinforce uses plain "
                            "REINFORCE (no ratio): choose algo grpo, rloo or ppo for it")
        steps = self.epochs * self.minibatches  # optimiser steps per rollout
        if self.objective == "reinforce" and steps > 1:
            raise UserError(f"algo {self.algo} with epochs={self.epochs} x minibatches={self.minibatches} > 1 "
                            "trains off-policy without importance weights after the first step (objective "
                            "reinforce has no ratio); use algo "
                            "grpo, rloo or ppo for several update steps per rollout, or epochs=1 and "
                            "minibatches=1")
        if self.algo in ("grpo", "rloo", "ppo") and self.objective in ONE_STEP_PLAIN_PG and steps == 1:
            raise UserError(f"objective {self.objective} with one optimiser step per rollout (epochs=1, "
                            f"minibatches=1) is plain policy gradient: {ONE_STEP_PLAIN_PG[self.objective]}; "
                            "set epochs or minibatches > 1 (or objective: clip)")
        tracker_names(self.report_to)  # an unknown tracker name: one sentence
        if self.push_to_hub is not None:
            if self.algo == "reward_model":
                raise UserError("push_to_hub shares a policy's LoRA adapter; a reward_model run has none "
                                "(remove push_to_hub)")
            check_repo_id(self.push_to_hub)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop must be a list of non-empty strings, e.g. stop: [\"\\n\\n\"]; got {self.stop!r}")


# Ratio objectives that reduce to plain policy gradient when a rollout makes one optimiser step
# (its only step sees pi = pi_old: the ratio is 1 and the KL(pi_old || pi) penalty's gradient is 0)
ONE_STEP_PLAIN_PG = {
    "kl_penalty": "the ratio is 1 and the KL(pi_old || pi) penalty has zero gradient at its only step",
    "adaptive_kl": "the ratio is 1, the KL(pi_old || pi) penalty has zero gradient at its only step, "
                   "and the controller would steer a coefficient that does nothing",
    "none": "the importance ratio is 1 at its only step",
}
# each algo's own advantage estimator (adv_estimator: None)
DEFAULT_ADV_ESTIMATOR = {"grpo": "grpo", "rloo": "rloo", "reinforce": "reinforce", "ppo": "gae"}


@dataclass
class AgentConfig(LMConfig, AgentKeys):
    """A language model acting over many turns in a text environment (rlhf/agents/config.py holds
    the agent keys): LMConfig's keys, same meanings, the environment's return as the reward."""

    rewards: list = field(default_factory=lambda: ["env_return"])  # the environment's return (others can be added)
    max_new_tokens: int = 16             # tokens of one reply (generate mode)
    group_size: int = 8                  # episodes from one task seed
    eval_problems: int = 100             # held-out seeds played by `rlhf eval`

    choices = {**LMConfig.choices, **AgentKeys.agent_choices,
               "algo": tuple(a for a in LMConfig.choices["algo"] if a != "reward_model")}

    def validate(self) -> None:
        super().validate()
        self.validate_agent()


# algo name -> config class; names both families use (ppo, reinforce) keep their LM entry and
# config_class settles them by the recipe's keys
CONFIGS: dict[str, type] = {a: LMConfig for a in LMConfig.choices["algo"]}
CONFIGS.update({a: GymConfig for a in GymConfig.choices["algo"] if a not in CONFIGS})


def load_recipe(path: str | None, overrides: list[str] = ()) -> LMConfig:
    """Read a YAML recipe (safe loader), apply ``key=value`` overrides, validate."""
    values = apply_overrides(read_recipe(path) if path is not None else {}, overrides)
    return build(config_class(values), values)


def config_class(values: dict) -> type:
    """The config family of a recipe: the one whose ``algo`` choices hold its algo. A name in
    two families (``ppo`` for LMs and for gym agents) is settled by which family's fields the
    recipe's keys belong to (``env:`` is gym, ``model:`` / ``task:`` are LM). A recipe with both
    ``env:`` and ``model:`` is an agent recipe (``AgentConfig``): a language model acting in an
    environment."""
    if "env" in values and "model" in values:  # a language model in an environment
        return AgentConfig
    algo = values.get("algo", "grpo")
    families = list(dict.fromkeys(CONFIGS.values()))
    classes = [c for c in families if isinstance(algo, str) and algo in c.choices["algo"]]
    if not classes:
        valid = sorted({a for c in families for a in c.choices["algo"]})
        raise UserError(f"unknown algo {algo!r}; valid: {', '.join(valid)}")
    # most keys in common wins (ties: the first family), so a typo still finds its family
    return max(classes, key=lambda c: len(set(values) & ({f.name for f in dataclasses.fields(c)}
                                                         | set(RENAMED.get(c.__name__, {})))))


def build(cls, values: dict):
    """A validated ``cls`` from a recipe's ``values``: old keys renamed, every unknown key named
    in one error, each value typed as its field, then ranges and the family's own checks."""
    values = rename_deprecated(cls, values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in hints]
    if unknown:
        raise UserError(unknown_keys_message(cls.__name__, unknown, names))
    cfg = cls(**{key: _coerce(cls, key, value, hints[key]) for key, value in values.items()})
    check_ranges(cfg)  # every numeric key of every family: rlhf/validation.py's table
    cfg.validate()
    return cfg


def _coerce(cls, key: str, value, hint):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is type(None):
            continue
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    if key in cls.choices:  # a choice key: the choices, not the type, are what the user needs
        want = "one of " + ", ".join(cls.choices[key])
    else:
        want = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise UserError(f"recipe key {key!r} must be {want}, got {value!r}{value_note(cls.__name__, key)}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_run_config(run_dir: str):
    """The resolved config of a run directory (its ``recipe.yaml``), of either family."""
    values = read_run_recipe(run_dir)
    return build(config_class(values), values)
