"""Networks for gym agents: MLP actor-critic (categorical or diagonal Gaussian), Q-networks
with an optional dueling head, and SAC's squashed-Gaussian actor with twin critics.

Everything a trainer needs from an actor-critic is ``logp`` of chosen actions (plus entropy
and values), the same quantity the LM policy produces per token.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rlhf.core import entropy_from_logits, selective_log_softmax
from rlhf.gym.envs import ObsNormalizer

LOG_2PI = math.log(2 * math.pi)


def mlp(sizes: list[int], activation: str = "tanh", out_gain: float = 1.0, ortho: bool = True) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if ortho:  # orthogonal init: sqrt(2) for hidden layers, a chosen gain for the head
            last = i == len(sizes) - 2
            nn.init.orthogonal_(lin.weight, out_gain if last else math.sqrt(2))
            nn.init.zeros_(lin.bias)
        layers += [lin] if i == len(sizes) - 2 else [lin, act()]
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs over normalised observations.

    Discrete actions: categorical over logits [N, A]. Continuous: diagonal Gaussian
    N(mu(s), exp(log_std)^2) with a state-independent ``log_std`` [A]; actions are clipped to
    the env's bounds by the env, log-probs are of the unclipped sample.
    """

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int = 64, layers: int = 2,
                 activation: str = "tanh", ortho: bool = True, norm_obs: bool = False,
                 clip_obs: float = 10.0, log_std_init: float = 0.0):
        super().__init__()
        self.discrete = discrete
        self.obs_norm = ObsNormalizer(obs_dim, norm_obs, clip_obs)
        sizes = [obs_dim] + [hidden] * layers
        self.actor = mlp(sizes + [act_dim], activation, 0.01, ortho)
        self.critic = mlp(sizes + [1], activation, 1.0, ortho)
        if not discrete:
            self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def value(self, obs: Tensor) -> Tensor:
        """V(s): obs [N, D] (raw) -> [N]."""
        return self.critic(self.obs_norm(obs)).squeeze(-1)

    def dist_params(self, obs: Tensor) -> Tensor:
        """Logits [N, A] (discrete) or means [N, A] (continuous) for raw obs."""
        return self.actor(self.obs_norm(obs))

    def logp_entropy(self, params: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """log pi(a|s) [N] and entropy [N] from ``dist_params`` output."""
        if self.discrete:
            return selective_log_softmax(params, actions.long()), entropy_from_logits(params)
        log_std = self.log_std.expand_as(params)
        z = (actions - params) * torch.exp(-log_std)
        logp = (-0.5 * z**2 - log_std - 0.5 * LOG_2PI).sum(-1)
        ent = (log_std + 0.5 * (1 + LOG_2PI)).sum(-1)
        return logp, ent

    @torch.no_grad()
    def act(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sample: ``(actions, logp [N], values [N])`` for a rollout."""
        x = self.obs_norm(obs)
        params, values = self.actor(x), self.critic(x).squeeze(-1)
        if self.discrete:
            gumbel = -torch.log(-torch.log(torch.rand_like(params).clamp_(1e-20, 1.0)))
            actions = torch.argmax(params + gumbel, dim=-1)
        else:
            actions = params + torch.randn_like(params) * torch.exp(self.log_std)
        logp, _ = self.logp_entropy(params, actions)
        return actions, logp, values

    @torch.no_grad()
    def act_deterministic(self, obs: Tensor) -> Tensor:
        params = self.dist_params(obs)
        return params.argmax(-1) if self.discrete else params

    def kl_from(self, old_params: Tensor, params: Tensor, old_log_std: Tensor | None = None) -> Tensor:
        """Exact KL(pi_old || pi) per state [N] (TRPO's constraint and Fisher)."""
        if self.discrete:
            old_lp, lp = torch.log_softmax(old_params, -1), torch.log_softmax(params, -1)
            return (old_lp.exp() * (old_lp - lp)).sum(-1)
        log_std = self.log_std.expand_as(params)
        old_log_std = old_log_std.expand_as(params)
        var, old_var = torch.exp(2 * log_std), torch.exp(2 * old_log_std)
        kl = log_std - old_log_std + (old_var + (old_params - params) ** 2) / (2 * var) - 0.5
        return kl.sum(-1)


class QNetwork(nn.Module):
    """Q(s, .) [N, A]; dueling: ``V(s) + A(s, a) - mean_a A(s, a)`` (Wang et al. 2016)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 256, layers: int = 2,
                 activation: str = "relu", dueling: bool = False, norm_obs: bool = False, clip_obs: float = 10.0):
        super().__init__()
        self.obs_norm = ObsNormalizer(obs_dim, norm_obs, clip_obs)
        self.dueling = dueling
        body = [obs_dim] + [hidden] * layers
        if dueling:
            self.body = nn.Sequential(mlp(body, activation, ortho=False), nn.ReLU() if activation == "relu" else nn.Tanh())
            self.value_head = nn.Linear(hidden, 1)
            self.adv_head = nn.Linear(hidden, n_actions)
        else:
            self.net = mlp(body + [n_actions], activation, ortho=False)

    def forward(self, obs: Tensor) -> Tensor:
        x = self.obs_norm(obs)
        if not self.dueling:
            return self.net(x)
        h = self.body(x)
        adv = self.adv_head(h)
        return self.value_head(h) + adv - adv.mean(-1, keepdim=True)

    @torch.no_grad()
    def act_deterministic(self, obs: Tensor) -> Tensor:
        return self(obs).argmax(-1)


class SquashedGaussianActor(nn.Module):
    """SAC's actor: a = scale * tanh(u) + bias, u ~ N(mu(s), sigma(s)^2), with the
    change-of-variables log-prob ``log N(u) - sum log(scale * (1 - tanh(u)^2))``."""

    def __init__(self, obs_dim: int, act_dim: int, low, high, hidden: int = 256, layers: int = 2,
                 norm_obs: bool = False, clip_obs: float = 10.0):
        super().__init__()
        self.obs_norm = ObsNormalizer(obs_dim, norm_obs, clip_obs)
        self.body = nn.Sequential(mlp([obs_dim] + [hidden] * layers, "relu", ortho=False), nn.ReLU())
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("scale", (high - low) / 2)
        self.register_buffer("bias", (high + low) / 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised sample: ``(actions [N, A], logp [N])``."""
        h = self.body(self.obs_norm(obs))
        mu, log_std = self.mu(h), self.log_std(h).clamp(-20, 2)
        u = mu + torch.randn_like(mu) * log_std.exp()
        a = torch.tanh(u)
        logp = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI).sum(-1)
        # log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)), numerically stable
        logp = logp - (2 * (math.log(2) - u - nn.functional.softplus(-2 * u)) + torch.log(self.scale)).sum(-1)
        return a * self.scale + self.bias, logp

    @torch.no_grad()
    def act_deterministic(self, obs: Tensor) -> Tensor:
        h = self.body(self.obs_norm(obs))
        return torch.tanh(self.mu(h)) * self.scale + self.bias


class TwinQ(nn.Module):
    """Two independent critics Q1, Q2(s, a) -> [N] each (clipped double-Q, Fujimoto et al. 2018)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        sizes = [obs_dim + act_dim] + [hidden] * layers + [1]
        self.q1, self.q2 = mlp(sizes, "relu", ortho=False), mlp(sizes, "relu", ortho=False)

    def forward(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, actions], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)
