"""Typed recipe defaults for gym agents. A recipe is YAML that only overrides these.

    rlhf train recipes/ppo_cartpole.yaml --set seed=1

``reinforce`` and ``ppo`` are algorithm names of both families; ``rlhf.config.config_class``
settles them by the recipe's keys (``env:`` and the fields below are gym). a2c, trpo, dqn, sac
and q_learning exist only here. Gym ``reinforce`` is REINFORCE with a learned value baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.core import ADV_ESTIMATORS, POLICY_OBJECTIVES
from rlhf.errors import UserError, check_choices
from rlhf.tracking import tracker_names

ON_POLICY = ("reinforce", "a2c", "ppo", "trpo")
OFF_POLICY = ("dqn", "sac")
TABULAR = ("q_learning",)
# the on-policy algorithms' own advantage estimator and policy objective (ppo's objective: the recipe's)
DEFAULT_ADV_ESTIMATOR = {"reinforce": "reinforce", "a2c": "gae", "ppo": "gae", "trpo": "gae"}
FIXED_OBJECTIVE = {"reinforce": "reinforce", "a2c": "reinforce", "trpo": "none"}
PPO_OBJECTIVES = ("clip", "kl_penalty", "adaptive_kl")


@dataclass
class GymConfig:
    """A classic control agent on a gymnasium env, trained with the shared loss core."""

    algo: str = "ppo"                    # reinforce | a2c | ppo | trpo | dqn | sac | q_learning
    env: str = "CartPole-v1"             # gymnasium env id
    seed: int = 0                        # seeds envs, network init and sampling
    total_steps: int = 100_000           # environment steps (summed over parallel envs)
    n_envs: int = 8                      # parallel environments
    env_processes: bool = False          # step each env in its own worker process (slow envs only)
    threads: int = 1                     # torch intra-op threads
    gamma: float = 0.99                  # discount
    lr: float = 3e-4                     # learning rate (actor and critic)
    lr_schedule: str = "constant"        # constant | linear (decay to 0 over total_steps)
    optimizer: str = "adam"              # adam | rmsprop (A2C's classic choice)
    hidden: int = 64                     # width of each hidden layer
    layers: int = 2                      # hidden layers per network
    activation: str = "tanh"             # tanh | relu
    ortho_init: bool = True              # orthogonal init with small policy-head gain (SB3/CleanRL)
    max_grad_norm: float = 0.5           # gradient clipping (0 disables)
    norm_obs: bool = False               # running mean/std observation normalisation (saved with the policy)
    norm_reward: bool = False            # scale rewards by a running std of the discounted return
    clip_obs: float = 10.0               # clip normalised observations to +-clip_obs
    # --- on-policy (reinforce, a2c, ppo, trpo)
    n_steps: int = 128                   # rollout length per env between updates
    adv_estimator: str | None = None     # a name in rlhf.core.ADV_ESTIMATORS (verl's key). None: the algo's own,
                                         # reinforce -> reinforce (Monte-Carlo return - V), a2c | ppo | trpo ->
                                         # gae (bootstrapped on truncation); off-policy algos have none
    gae_lambda: float = 0.95             # GAE lambda (reinforce uses Monte-Carlo returns)
    epochs: int = 4                      # update epochs per rollout (ppo)
    minibatches: int = 4                 # optimiser steps per epoch (ppo, trpo critic), each on
                                         # n_steps * n_envs / minibatches rows; must divide that
    objective: str | None = None         # ppo surrogate: clip | kl_penalty | adaptive_kl (the last two need
                                         # more than one optimiser step per rollout). None: clip for ppo; the
                                         # others' own: reinforce, a2c -> reinforce, trpo -> none (plain ratio)
    clip_range: float = 0.2              # ppo clip epsilon
    clip_schedule: str = "constant"      # constant | linear (clip epsilon decays with lr)
    clip_range_value: float | None = None  # value clipping epsilon (None: no value clipping)
    penalty_coef: float = 1.0            # kl_penalty / adaptive_kl: (initial) coefficient of KL(pi_old || pi)
    target_kl: float = 0.01              # adaptive-KL target (ppo), KL radius (trpo)
    ent_coef: float = 0.0                # entropy bonus
    vf_coef: float = 0.5                 # value-loss weight
    norm_adv: bool = True                # whiten advantages per minibatch (reinforce, a2c, trpo: per rollout)
    log_std_init: float = 0.0            # Gaussian policies: initial state-independent log-std
    cg_iters: int = 10                   # trpo: conjugate-gradient iterations
    cg_damping: float = 0.1              # trpo: Fisher damping
    line_search_steps: int = 10          # trpo: backtracking halvings
    critic_updates: int = 10             # trpo: critic epochs per rollout
    # --- off-policy (dqn, sac)
    buffer_size: int = 100_000           # replay capacity (transitions)
    batch_size: int = 64                 # replay minibatch
    learning_starts: int = 1000          # env steps before the first update
    train_freq: int = 4                  # env steps (per env) between update phases
    gradient_steps: int = 1              # optimiser steps per update phase (-1: as many as env steps)
    target_update: int = 500             # dqn: env steps between hard target copies
    tau: float = 0.005                   # sac: Polyak rate of the target critics
    double: bool = False                 # dqn: Double-DQN target (online argmax, target value)
    dueling: bool = False                # dqn: dueling head V(s) + A(s,a) - mean A
    network: str = "mlp"                 # dqn Q-network: mlp (flat observations) | nature_cnn (Atari's
                                         # 84x84 frame stacks) | minatar_cnn (MinAtar's 10x10 grids)
    device: str = "cpu"                  # dqn: where the Q-networks train: cpu | cuda (replay stays in
                                         # CPU memory; minibatches move); the other algos run on cpu
    eps_start: float = 1.0               # dqn: initial exploration epsilon
    eps_end: float = 0.05                # dqn: final epsilon
    eps_fraction: float = 0.1            # dqn: fraction of total_steps over which epsilon decays
    loss: str = "huber"                  # dqn TD loss: huber | mse
    alpha: float | None = None           # sac: fixed entropy temperature (None: automatic tuning)
    target_entropy: float | None = None  # sac: target entropy (None: -action_dim)
    # --- tabular (q_learning)
    alpha_q: float = 0.1                 # q_learning step size
    eps_decay_episodes: int = 5000       # q_learning: episodes over which epsilon decays
    # --- logging and evaluation
    log_every: int = 10_000              # env steps between metric rows / progress updates
    select_every: int = 0                # >0: every N env steps, score the policy on select_episodes
                                         # held-out episodes and keep the best weights (rl-zoo's
                                         # EvalCallback practice); 0: keep the final weights
    select_episodes: int = 5             # deterministic episodes per selection check (seeds apart from eval's)
    eval_episodes: int = 20              # deterministic episodes in the final evaluation
    save_every: int = 0                  # env steps between resumable checkpoints (--resume; 0: none)
    keep_checkpoints: int = 2            # complete checkpoints kept (the newest and older ones to fall back on
                                         # when the newest is unreadable); >= 1
    eval_seed: int = 1_000_000           # first seed of evaluation episodes (never used in training)
    report_to: str | list = "none"       # trackers beside metrics.jsonl: tensorboard | wandb | trackio | mlflow,
                                         # one or a list (none: no tracker); rlhf/tracking.py says where each writes
    out_dir: str = "runs"                # where run directories are created
    run_name: str | None = None          # run directory name (default: recipe name + time)

    choices = {
        "algo": ON_POLICY + OFF_POLICY + TABULAR,
        "lr_schedule": ("constant", "linear"),
        "clip_schedule": ("constant", "linear"),
        "optimizer": ("adam", "rmsprop"),
        "activation": ("tanh", "relu"),
        "adv_estimator": ADV_ESTIMATORS,  # registries: an estimator or objective registered in code is valid
        "objective": POLICY_OBJECTIVES,
        "loss": ("huber", "mse"),
        "network": ("mlp", "nature_cnn", "minatar_cnn"),
        "device": ("cpu", "cuda"),
    }

    def __post_init__(self) -> None:  # the algo's own choices, written into the resolved recipe
        if self.adv_estimator is None:
            self.adv_estimator = DEFAULT_ADV_ESTIMATOR.get(self.algo)
        if self.objective is None or (self.algo != "ppo" and self.objective == "clip"):
            # (recipes resolved before each algo's own objective was written held clip for every algo)
            self.objective = "clip" if self.algo == "ppo" else FIXED_OBJECTIVE.get(self.algo)

    def validate(self) -> None:
        # numeric ranges are checked in one place for every family: rlhf/validation.py (RANGES)
        check_choices(self)
        if self.adv_estimator in ("grpo", "rloo"):
            raise UserError(f"adv_estimator {self.adv_estimator} baselines a group of completions of one prompt "
                            f"(LM); gym algos use {', '.join(sorted(set(DEFAULT_ADV_ESTIMATOR.values())))}")
        if self.adv_estimator is not None and self.algo not in ON_POLICY:
            raise UserError(f"adv_estimator is an on-policy setting; algo {self.algo} learns from values "
                            "(remove adv_estimator from the recipe)")
        tracker_names(self.report_to)  # an unknown tracker name: one sentence
        if self.algo == "ppo" and self.objective != "clip" and self.ppo_steps_per_rollout() == 1:
            raise UserError(f"objective {self.objective} with one optimiser step per rollout (epochs="
                            f"{self.epochs}, minibatches={self.minibatches}) is plain policy gradient: the ratio is 1 and the "
                            "KL(pi_old || pi) penalty has zero gradient at its only step; set epochs or "
                            "minibatches > 1 (or objective: clip)")
        if self.algo == "ppo" and self.objective not in PPO_OBJECTIVES:
            raise UserError(f"objective {self.objective} with algo ppo: choose one of {', '.join(PPO_OBJECTIVES)}")
        if self.algo != "ppo" and self.objective != FIXED_OBJECTIVE.get(self.algo):
            raise UserError(f"objective {self.objective} is a ppo surrogate; algo {self.algo} has its own fixed "
                            "objective and would ignore it: remove objective from the recipe, or use algo ppo")
        if self.algo in ("ppo", "trpo") and (self.n_steps * self.n_envs) % self.minibatches:
            raise UserError(f"minibatches={self.minibatches} must divide n_steps * n_envs = "
                            f"{self.n_steps * self.n_envs} (the rows of a rollout)")
        if self.device != "cpu" and self.algo != "dqn":
            raise UserError(f"device {self.device} is supported by algo dqn only; {self.algo} trains on the "
                            "cpu: remove device from the recipe")
        if self.algo == "sac" and self.norm_obs:
            raise UserError("norm_obs is not supported by sac (its twin critics read raw observations); "
                            "remove norm_obs from the recipe, or use algo ppo")

    def ppo_steps_per_rollout(self) -> int:
        """Optimiser steps ppo makes per rollout: epochs x minibatches."""
        return self.epochs * self.minibatches


def minibatches_from_size(size, values: dict) -> int:
    """The minibatch count that reproduces the old ``minibatch_size`` key exactly: the old loop
    made min(size, N) row minibatches of a rollout of N = n_steps * n_envs rows, dropping N % size."""
    steps, envs = values.get("n_steps", GymConfig.n_steps), values.get("n_envs", GymConfig.n_envs)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"minibatch_size must be a count >= 1 (got {size!r}); it is deprecated: set "
                        "minibatches (optimiser steps per epoch) instead")
    if not all(isinstance(x, int) and x >= 1 for x in (steps, envs)):
        return GymConfig.minibatches  # n_steps / n_envs are refused by name when the config is built
    n = steps * envs
    if values.get("algo", GymConfig.algo) not in ("ppo", "trpo") and n % min(size, n):
        return GymConfig.minibatches  # the other algorithms never read it (an old run's recipe.yaml)
    if size < n and n % size:
        raise UserError(f"minibatch_size={size} (deprecated) does not divide n_steps * n_envs = {n}, so "
                        f"no minibatch count gives the same minibatches; set minibatches (e.g. "
                        f"{max(1, n // size)}: {n // max(1, n // size)} rows each) instead")
    return max(1, n // size)
