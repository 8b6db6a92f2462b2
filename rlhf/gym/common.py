"""What every gym trainer shares: checks of the env against the algorithm, the network each
algorithm saves, saving/loading it as safetensors, gradient clipping."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.gym import policies as P
from rlhf.gym.config import OFF_POLICY, ON_POLICY, GymConfig
from rlhf.gym.envs import is_frame_stack, is_image_space, make_env, space_kind

POLICY_DIR = "policy"
POLICY_FILE = "model.safetensors"


def env_spec(cfg: GymConfig) -> dict:
    """Create one env, check it suits ``cfg.algo`` and return its dimensions."""
    env = make_env(cfg.env)
    obs_kind, act_kind = space_kind(env.observation_space), space_kind(env.action_space)
    spec = {"obs_kind": obs_kind, "act_kind": act_kind}
    image = is_image_space(env.observation_space)
    if image:
        spec.update(obs_shape=list(env.observation_space.shape), obs_high=float(env.observation_space.high.max()),
                    frame_stacked=is_frame_stack(env))
    env.close()
    if cfg.algo == "q_learning":
        if obs_kind != "discrete" or act_kind != "discrete":
            raise UserError(f"q_learning needs discrete observations and actions; {cfg.env} has {obs_kind} "
                            f"observations and {act_kind} actions (try FrozenLake-v1 or Taxi-v3)")
        spec.update(n_states=int(env.observation_space.n), n_actions=int(env.action_space.n))
        return spec
    if image:
        check_image_settings(cfg, spec["obs_shape"])
    elif obs_kind != "box" or len(env.observation_space.shape) != 1:
        raise UserError(f"{cfg.algo} needs a flat Box observation space; {cfg.env} has "
                        f"{env.observation_space} (tabular envs: use algo q_learning)")
    elif cfg.network != "mlp":
        raise UserError(f"network {cfg.network} reads images, but {cfg.env} has flat observations "
                        f"{env.observation_space}; set network: mlp")
    spec["obs_dim"] = int(np.prod(env.observation_space.shape))
    if act_kind == "discrete":
        spec["act_dim"] = int(env.action_space.n)
    elif act_kind == "box":
        spec.update(act_dim=int(env.action_space.shape[0]), low=env.action_space.low.tolist(),
                    high=env.action_space.high.tolist())
    else:
        raise UserError(f"{cfg.env} has {act_kind} actions; supported: Discrete or Box")
    if cfg.algo == "dqn" and act_kind != "discrete":
        raise UserError(f"dqn needs discrete actions but {cfg.env} has continuous (Box) actions; "
                        "use algo sac or ppo for it")
    if cfg.algo == "sac" and act_kind != "box":
        raise UserError(f"sac needs continuous (Box) actions but {cfg.env} has discrete ones; "
                        "use algo dqn or ppo for it")
    return spec


# smallest frame nature_cnn takes: 8x8/4 -> 4x4/2 -> 3x3/1 leaves a 1x1 map at 36 pixels
NATURE_CNN_MIN_SIZE = 36


def check_image_settings(cfg: GymConfig, shape: list[int]) -> None:
    """Image observations [C, H, W] train with dqn and a CNN; anything else is one sentence."""
    if cfg.algo != "dqn":
        raise UserError(f"{cfg.algo} reads flat observations, but {cfg.env} gives images {tuple(shape)}; "
                        "train image envs with algo dqn and network nature_cnn (Atari) or minatar_cnn (MinAtar)")
    if cfg.network == "mlp":
        raise UserError(f"{cfg.env} gives images {tuple(shape)}; set network: nature_cnn (Atari's 84x84 frames) "
                        "or minatar_cnn (MinAtar's 10x10 grids)")
    if cfg.norm_obs:
        raise UserError(f"norm_obs does not apply to the images of {cfg.env} (the CNN scales pixels to [0, 1] "
                        "itself); remove norm_obs from the recipe")
    if cfg.network == "nature_cnn" and min(shape[1:]) < NATURE_CNN_MIN_SIZE:
        raise UserError(f"network nature_cnn needs images of at least {NATURE_CNN_MIN_SIZE}x{NATURE_CNN_MIN_SIZE}; "
                        f"{cfg.env} gives {shape[1]}x{shape[2]}: use network minatar_cnn")


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global L2 norm is at most ``max_norm``;
    returns the norm before clipping. Same arithmetic as ``torch.nn.utils.clip_grad_norm_``
    (factor ``min(1, max_norm / (norm + 1e-6))``) in three foreach kernels, without its
    per-call grouping of tensors by device and dtype: ~0.07 ms instead of ~0.16 ms per call
    for a 2x64 actor-critic, paid on every one of PPO's and DQN's thousands of steps."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def build_agent(cfg: GymConfig, spec: dict) -> nn.Module:
    """The network an algorithm acts with (and saves): its ``act_deterministic`` drives eval."""
    if cfg.algo in ON_POLICY:
        return P.ActorCritic(spec["obs_dim"], spec["act_dim"], spec["act_kind"] == "discrete", cfg.hidden,
                             cfg.layers, cfg.activation, cfg.ortho_init, cfg.norm_obs, cfg.clip_obs,
                             cfg.log_std_init)
    if cfg.algo == "dqn":
        return P.QNetwork(spec.get("obs_shape", spec["obs_dim"]), spec["act_dim"], cfg.hidden, cfg.layers,
                          cfg.activation, cfg.dueling, cfg.norm_obs, cfg.clip_obs, cfg.network,
                          spec.get("obs_high", 255.0))
    if cfg.algo == "sac":
        return P.SquashedGaussianActor(spec["obs_dim"], spec["act_dim"], spec["low"], spec["high"],
                                       cfg.hidden, cfg.layers, cfg.norm_obs, cfg.clip_obs)
    assert cfg.algo not in OFF_POLICY
    return QTable(spec["n_states"], spec["n_actions"])


class QTable(nn.Module):
    """Tabular Q-values [S, A] as a buffer, so it saves like any network."""

    def __init__(self, n_states: int, n_actions: int):
        super().__init__()
        self.register_buffer("q", torch.zeros(n_states, n_actions, dtype=torch.float64))

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q[obs.long().reshape(-1)].argmax(-1)


def save_agent(run, agent: nn.Module) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in agent.state_dict().items()}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / POLICY_FILE))

    return run.save_atomic(POLICY_DIR, write)


def load_agent(run_dir: str, cfg: GymConfig) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(run_dir) / POLICY_DIR / POLICY_FILE
    if not path.is_file():
        raise UserError(f"{run_dir!r} has no saved policy ({POLICY_DIR}/{POLICY_FILE}); train it first")
    agent = build_agent(cfg, env_spec(cfg))
    agent.load_state_dict(load_file(str(path)))
    agent.eval()
    return agent
