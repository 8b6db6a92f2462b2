"""Typed recipe configs. A recipe is YAML that only overrides these defaults.

    rlhf train recipes/grpo_arith.yaml --set lr=1e-4 --set steps=50

Each key is documented once, by the comment on its field (``LMConfig`` below, ``GymConfig`` in
rlhf/gym/config.py). A concept both families have has one name in both, chosen for what a
TRL / CleanRL / SB3 user already knows. The old names still load (recipes, ``--set``, the
``recipe.yaml`` of older runs) with a one-line deprecation hint naming the new key; an old name
maps to its own family's concept (``RENAMED``), never to a different concept of the same name:

    concept                               name              old names (family)
    clip epsilon of the ratio (below 1)   clip_range        clip_low (LM); gym already clip_range
    clip epsilon above 1 (DAPO)           clip_range_high   clip_high (LM)
    value clipping epsilon                clip_range_value  value_clip (LM), clip_vloss (gym)
    GAE lambda                            gae_lambda        lam (LM)
    advantage whitening                   norm_adv          whiten_advantages (LM)
    minibatches per epoch (a count)       minibatches       minibatch_size (gym, a size: converted
                                                            to n_steps * n_envs / size, refused if
                                                            that is not a whole number)
    PPO-paper KL penalty beta             penalty_coef      kl_coef (gym)
    KL(pi || ref) coefficient             kl_coef           beta (LM, algos other than reward_model)
    reward-model log-ratio scale          rm_beta           beta (LM, algo reward_model)

``minibatches`` is a count because an LM minibatch holds whole groups; a gym minibatch holds
n_steps * n_envs / minibatches rows, which is the old ``minibatch_size`` exactly whenever that
divided the batch (every shipped recipe). TRL's ``kl_coef`` / ``beta`` mean ``kl_coef`` here
(``ALIASES``).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.errors import UserError, check_choices
from rlhf.gym.config import GymConfig, minibatches_from_size
from rlhf.hub import check_repo_id
from rlhf.tracking import tracker_names
from rlhf.validation import check_ranges

log = logging.getLogger(__name__)


@dataclass
class LMConfig:
    """Token-level RL on a causal LM with a LoRA adapter (GRPO; REINFORCE/RLOO by settings)."""

    algo: str = "grpo"                   # grpo | rloo | reinforce | ppo (value head + token GAE)
                                         # | reward_model (Bradley-Terry on preference pairs)
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
    kl_coef: float = 0.04                # KL(pi || ref) coefficient; 0 skips the reference pass (TRL's beta)
    kl_estimator: str | None = None      # k1 | k2 | k3 | k3+ (None: k3+ in the loss, k1 in the reward).
                                         # Gradients: loss k2, k3+ -> KL(pi||ref); loss k3 -> KL(ref||pi)
                                         # (GRPO paper); reward k1 -> KL(pi||ref). Other pairs are
                                         # refused (KL_REFUSED below; rlhf.core.objectives.kl_estimate)
    kl_placement: str = "loss"           # loss: kl_coef * KL term in the loss (GRPO); reward: -kl_coef * KL
                                         # folded into the reward (InstructGPT; per token for ppo)
    critic: str = "shared"               # ppo: shared (value head on the policy's LoRA trunk) | separate
                                         # (its own LoRA adapter on a second copy of the base model)
    vf_coef: float = 0.1                 # ppo: weight of the value loss
    clip_range_value: float | None = 0.2 # ppo: clip value updates to +-this around the rollout's values
    gamma: float = 1.0                   # ppo: discount over tokens
    gae_lambda: float = 0.95             # ppo: GAE lambda
    norm_adv: bool = True                # ppo: whiten token advantages over the batch
    objective: str = "clip"              # surrogate (PPO paper): clip | kl_penalty (fixed penalty_coef)
                                         # | adaptive_kl (penalty_coef halves/doubles around target_kl)
                                         # | none (unclipped ratio); all but clip need epochs x minibatches
                                         # > 1 (one step: ratio 1). algo reinforce uses plain REINFORCE
    penalty_coef: float = 1.0            # kl_penalty / adaptive_kl: (initial) coefficient of KL(pi_old || pi)
    target_kl: float = 0.01              # adaptive_kl: the KL(pi_old || pi) per token after the update that
                                         # the controller steers to (logged: kl_after_update)
    clip_range: float = 0.2              # PPO clip epsilon: the ratio is clipped below at 1 - clip_range
    clip_range_high: float | None = None # epsilon above 1 (None: = clip_range; DAPO uses 0.28)
    agg: str = "token_mean"              # token_mean | seq_mean | constant (Dr. GRPO)
    scale_rewards: str = "group"         # group | batch | none (std used in group advantages)
    mask_truncated: bool = False         # drop completions that hit max_new_tokens from the loss
    lora_r: int = 16                     # LoRA rank
    lora_alpha: int = 32                 # LoRA alpha (scale = alpha / r)
    lora_dropout: float = 0.0            # LoRA dropout (acts only with disable_dropout: false)
    lora_targets: str | list = "all-linear"  # peft target_modules
    dtype: str = "float32"               # base model weights: float32 | bfloat16 | float16 | auto (bf16 where
                                         # this machine runs it faster); LoRA, log-probs and loss stay fp32;
                                         # float16 (GPUs without bf16) trains with a loss scaler
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
        "objective": ("clip", "kl_penalty", "adaptive_kl", "none"),
        "critic": ("shared", "separate"),
        "agg": ("token_mean", "seq_mean", "constant"),
        "scale_rewards": ("group", "batch", "none"),
        "dtype": ("auto", "float32", "bfloat16", "float16"),
        "rm_head": ("log_ratio", "classifier"),
    }

    def __post_init__(self) -> None:
        if self.kl_estimator is None:  # the placement's default, written into the resolved recipe
            self.kl_estimator = DEFAULT_KL_ESTIMATOR.get(self.kl_placement)

    def validate(self) -> None:
        # numeric ranges are checked first, in one place for every family: rlhf/validation.py (RANGES)
        check_choices(self)
        refused = KL_REFUSED.get((self.kl_estimator, self.kl_placement))
        if refused:
            raise UserError(f"kl_estimator={self.kl_estimator} with kl_placement={self.kl_placement}: {refused}")
        if self.algo in ("grpo", "rloo") and self.group_size < 2:
            raise UserError(f"{self.algo} needs group_size >= 2 (got {self.group_size}): its baseline is "
                            "the other completions of the same prompt; use algo: reinforce for 1")
        if self.prompts_per_step % self.minibatches:
            raise UserError(f"minibatches={self.minibatches} must divide prompts_per_step="
                            f"{self.prompts_per_step} (a minibatch holds whole groups)")
        if self.algo == "reinforce" and self.objective != "clip":
            raise UserError(f"objective {self.objective!r} is a ratio surrogate; algo reinforce uses plain "
                            "REINFORCE (no ratio): choose algo grpo, rloo or ppo for it")
        steps = self.epochs * self.minibatches  # optimiser steps per rollout
        if self.algo == "reinforce" and steps > 1:
            raise UserError(f"algo reinforce with epochs={self.epochs} x minibatches={self.minibatches} > 1 "
                            "trains off-policy without importance weights after the first step; use algo "
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
# Default KL estimator of each placement. In the loss, k3+ (ratio-weighted k3, TRL's bias
# correction): on-policy its per-sample gradient is k2's, log(pi/ref) * grad log pi, so both
# descend KL(pi||ref) with the same variance; after the first of several minibatches (samples
# from pi_old) its importance ratio keeps the expected gradient exact where k2's drifts, and its
# logged value stays an unbiased KL(pi||ref) where k2's is biased (tests/test_kl_grad.py).
DEFAULT_KL_ESTIMATOR = {"loss": "k3+", "reward": "k1"}
# (estimator, placement) pairs whose expected gradient has no correct meaning, and the fix
KL_REFUSED = {
    ("k1", "loss"): "k1 in the loss has zero expected gradient (E_pi[grad log pi] = 0), so it adds "
                    "noise and no pull toward the reference; use k3+ or k2 in the loss, or k1 with "
                    "kl_placement: reward",
    ("k2", "reward"): "k2 in the reward is a biased penalty whose score-function gradient descends "
                      "neither KL direction; use k1 in the reward (InstructGPT), or k2 / k3+ with "
                      "kl_placement: loss",
    ("k3", "reward"): "k3 in the reward has almost no gradient (it descends KL(pi||ref) - KL(ref||pi), "
                      "~0 near the reference); use k1 in the reward (InstructGPT), or k3+ with "
                      "kl_placement: loss",
    ("k3+", "reward"): "k3+ is a loss-side correction (its ratio weight is 1 in a reward, which leaves "
                       "k3, with almost no gradient); use k1 in the reward (InstructGPT), or k3+ with "
                       "kl_placement: loss",
}

# old recipe key -> its new key, per family (the module docstring's table); (new key, note) adds a
# note to the hint. A function maps an old key whose new key or value depends on the recipe:
# (old value, recipe values) -> (new key, new value, note).
RENAMED: dict[str, dict] = {
    "LMConfig": {
        "clip_low": "clip_range", "clip_high": "clip_range_high", "value_clip": "clip_range_value",
        "lam": "gae_lambda", "whiten_advantages": "norm_adv",
        # beta was the KL(pi || ref) coefficient, and a reward model's log-ratio scale
        "beta": lambda v, values: ("rm_beta" if values.get("algo") == "reward_model" else "kl_coef", v, ""),
    },
    "GymConfig": {
        "clip_vloss": "clip_range_value",
        "kl_coef": ("penalty_coef", "; kl_coef was the PPO-paper penalty here, and names the KL-to-reference "
                    "coefficient of LM recipes"),
        "minibatch_size": lambda v, values: ("minibatches", minibatches_from_size(v, values), "converted"),
    },
}


def rename_deprecated(cls, values: dict) -> dict:
    """``values`` with each old key of ``cls``'s family replaced by its new key, one logged line
    per old key; of an old key and its new key both given, the later one counts."""
    renamed = RENAMED.get(cls.__name__, {})
    out = {}
    for key, value in values.items():
        if key not in renamed:
            out[key] = value
            continue
        rule = renamed[key]
        if callable(rule):
            new, new_value, note = rule(value, values)
        else:
            (new, note), new_value = (rule, "") if isinstance(rule, str) else rule, value
        if new in values:  # the later one wins, as a repeated --set does (an override comes after the file)
            order = list(values)
            later = key if order.index(key) > order.index(new) else new
            log.warning(f"recipe keys {key!r} and {new!r} are the same setting ({key!r} is its old name); "
                        f"the later, {later!r}, is used")
            if later == new:
                continue
        same = f": {new}={new_value!r} makes the same minibatches here" if note == "converted" else \
            f", the same setting{note}"
        log.warning(f"recipe key {key!r} is deprecated: use {new!r}{same}")
        out[new] = new_value
    return out


# names users bring from TRL / other toolkits -> ours, for "did you mean" hints: true
# equivalents only (following a hint must not change the algorithm)
ALIASES = {"learning_rate": "lr", "num_generations": "group_size", "beta": "kl_coef",
           "epsilon": "clip_range", "epsilon_high": "clip_range_high", "num_iterations": "epochs",
           "cliprange": "clip_range", "cliprange_value": "clip_range_value", "lam": "gae_lambda",
           "clip_coef": "clip_range", "num_minibatches": "minibatches",
           "max_completion_length": "max_new_tokens", "reward_funcs": "rewards",
           "model_name_or_path": "model", "max_steps": "steps", "loss_type": "agg",
           "dataset_name": "task", "dataset_config": "task_config", "dataset_train_split": "task_split",
           "dataset_test_split": "eval_split"}
# names whose nearest knob here means something else: what to do instead
NOT_EQUIVALENT = {
    "gradient_accumulation_steps": "it has no counterpart here, since every optimiser step already sees "
        "its whole minibatch at once (minibatches: N is not accumulation: it makes N separate optimiser "
        "steps per epoch, which changes the algorithm)",
    "per_device_train_batch_size": "TRL counts completions per device per micro-batch; here a rollout "
        "samples prompts_per_step x group_size completions, so set prompts_per_step (distinct prompts) and "
        "group_size (completions per prompt) for the rollout you want",
}
# algo name -> config class; names both families use (ppo, reinforce) keep their LM entry and
# config_class settles them by the recipe's keys
CONFIGS: dict[str, type] = {a: LMConfig for a in LMConfig.choices["algo"]}
CONFIGS.update({a: GymConfig for a in GymConfig.choices["algo"] if a not in CONFIGS})


def load_recipe(path: str | None, overrides: list[str] = ()) -> LMConfig:
    """Read a YAML recipe (safe loader), apply ``key=value`` overrides, validate."""
    values = read_recipe(path) if path is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key.strip()] = raw
    return build(config_class(values), values)


def read_recipe(path: str) -> dict:
    """The key: value mapping of a YAML recipe file (safe loader), unvalidated."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe {path!r} does not exist; see recipes/ for examples")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(values, dict):
        raise UserError(f"recipe {path!r} must be a mapping of key: value")
    return values


def config_class(values: dict) -> type:
    """The config family of a recipe: the one whose ``algo`` choices hold its algo. A name in
    two families (``ppo`` for LMs and for gym agents) is settled by which family's fields the
    recipe's keys belong to (``env:`` is gym, ``model:`` / ``task:`` are LM)."""
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
    values = rename_deprecated(cls, values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        other = key not in hints and next((k for k in NOT_EQUIVALENT if k == key or
                                           difflib.SequenceMatcher(None, key, k).ratio() > 0.8), None)
        if other:
            raise UserError(f"unknown recipe key {key!r}: {NOT_EQUIVALENT[other]}")
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            alias = ALIASES.get(key) or next((v for k, v in ALIASES.items()
                                              if difflib.SequenceMatcher(None, key, k).ratio() > 0.8), None)
            if alias in names:  # the true equivalent first
                close = [alias] + [c for c in close if c != alias]
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys: {', '.join(names)}"
            raise UserError(f"unknown recipe key {key!r}; {hint}")
        kwargs[key] = _coerce(key, value, hints[key])
    cfg = cls(**kwargs)
    check_ranges(cfg)  # every numeric key of every family: rlhf/validation.py's table
    cfg.validate()
    return cfg


def _coerce(key: str, value, hint):
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
    want = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise UserError(f"recipe key {key!r} must be {want}, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_run_config(run_dir: str):
    """The resolved config of a run directory (its ``recipe.yaml``), of either family."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir!r} is not a run directory (no recipe.yaml); pass the run_dir "
                        "printed by `rlhf train`")
    values = yaml.safe_load(path.read_text()) or {}
    return build(config_class(values), values)
