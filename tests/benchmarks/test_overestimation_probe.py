"""benchmarks/seeds/overestimation.py: the probe's true-return rollouts against hand-computed
returns, the probe leaving training untouched, and the --quick sweep's JSON."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf.config import load_recipe
from rlhf.gym.envs import make_env
from rlhf.gym.replay import ReplayBuffer

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("overestimation", ROOT / "benchmarks/seeds/overestimation.py")
oe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oe)

GAMMA = 0.99
# Returns are sums of at most 500 float32 rewards of +-1 times powers of gamma: float32 rounding
# is ~1e-7 relative per term, so 1e-4 absolute is loose on any CPU and far below one reward.
TOL = 1e-4


def _envs(env_id, k):
    envs = [make_env(env_id).unwrapped for _ in range(k)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
    return envs


def test_cartpole_return_hand_checked():
    # Row 0: cart at x=2.3 moving right at 3 m/s. Euler steps x by 0.02 * x_dot before x_dot
    # changes (by at most 0.02 * 10/1.1 * (1+...) < 0.2 per step, either action), so x = 2.36
    # after step 1 (alive) and x >= 2.36 + 0.02 * 2.8 > 2.4 after step 2: terminated, whatever
    # the policy does. Rewards 1, 1 -> G = 1 + gamma.
    # Row 1: cart at x=2.5 already outside: the first step terminates, G = 1.
    obs = np.array([[2.3, 3.0, 0.0, 0.0], [2.5, 0.0, 0.0, 0.0]], dtype=np.float32)
    for action in (0, 1):
        ret, lengths = oe.greedy_returns(None, _envs("CartPole-v1", 2), "CartPole-v1", obs, GAMMA, 500,
                                         act=lambda o, a=action: np.full(len(o), a))
        assert ret.tolist() == pytest.approx([1 + GAMMA, 1.0], abs=TOL)
        assert lengths.tolist() == [2, 1]


def test_truncation_at_horizon():
    # Upright and still at the centre, 3 steps cannot reach the 12-degree / 2.4 m limits:
    # the rollout is cut at the horizon, G = 1 + gamma + gamma^2 (nothing bootstrapped after).
    obs = np.zeros((1, 4), dtype=np.float32)
    ret, lengths = oe.greedy_returns(None, _envs("CartPole-v1", 1), "CartPole-v1", obs, GAMMA, 3,
                                     act=lambda o: np.zeros(len(o), dtype=np.int64))
    assert ret.item() == pytest.approx(1 + GAMMA + GAMMA ** 2, abs=TOL)
    assert lengths.tolist() == [3]


def test_acrobot_state_round_trip_and_goal():
    # The state set from an observation reproduces that observation (the angles come back
    # through atan2), and a state with the tip above the bar ends on the first step with
    # Acrobot's reward 0 on termination: G = 0. A hanging, still acrobot with torque 0 stays
    # put for 3 steps: G = -(1 + gamma + gamma^2).
    env = _envs("Acrobot-v1", 1)[0]
    state = np.array([2.0, -1.0, 0.5, -0.25])
    env.state = state.copy()
    obs = env._get_ob().astype(np.float32)
    oe.set_state(env, "Acrobot-v1", obs)
    assert np.allclose(env.state, state, atol=1e-6)  # float32 observation: ~6e-8 relative
    up = np.array([math.cos(math.pi), math.sin(math.pi), 1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    down = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    ret, lengths = oe.greedy_returns(None, _envs("Acrobot-v1", 2), "Acrobot-v1", np.stack([up, down]), GAMMA, 3,
                                     act=lambda o: np.ones(len(o), dtype=np.int64))  # action 1: torque 0
    assert ret.tolist() == pytest.approx([0.0, -(1 + GAMMA + GAMMA ** 2)], abs=TOL)
    assert lengths.tolist() == [1, 3]


def test_probe_q_side_and_recent_states():
    # The probe's Q is the mean of max_a Q over the states it drew, and those states are the
    # newest `window` transitions of the buffer, ring wrap-around included.
    buf = ReplayBuffer(8, 4, (), torch.long)
    for i in range(11):  # wraps: slots hold transitions 3..10
        o = np.full((1, 4), i / 100, dtype=np.float32)
        buf.add(o, np.zeros(1), np.zeros(1, dtype=np.float32), o, np.zeros(1, dtype=np.float32))
    probe = oe.OverestimationProbe("CartPole-v1", GAMMA, every=5, n_states=6, window=3, seed=0, horizon=4)
    states = probe.states(buf)
    assert set(np.round(states[:, 0] * 100).astype(int).tolist()) <= {8, 9, 10}
    qnet = torch.nn.Linear(4, 2)
    probe(4, qnet, buf)
    assert probe.rows == []  # not due yet
    probe(5, qnet, buf)
    (row,) = probe.rows
    assert row["step"] == 5 and math.isfinite(row["q"]) and math.isfinite(row["mc"])
    assert 1.0 <= row["mc"] <= 1 + GAMMA + GAMMA ** 2 + GAMMA ** 3 + TOL  # reward 1 a step, horizon 4
    assert row["q_minus_mc"] == pytest.approx(row["q"] - row["mc"], abs=TOL)


def test_probe_leaves_training_unchanged(tmp_path):
    # Same seed with and without the probe: the same weights (the probe draws from its own
    # generator and envs and only reads the net). Bit-identical: the same ops in the same order.
    from rlhf.gym.common import env_spec
    from rlhf.run import Run
    from rlhf.seeding import seed_everything
    from rlhf.trainers.dqn import train_dqn

    cfg = load_recipe(str(ROOT / "recipes/dqn_cartpole.yaml"),
                      ["total_steps=300", "learning_starts=50", "train_freq=100", "gradient_steps=5",
                       "select_every=0", "hidden=16", f"out_dir={tmp_path}"])
    nets = []
    for i, probe in enumerate([None, oe.OverestimationProbe("CartPole-v1", GAMMA, 100, 3, 50, 0)]):
        seed_everything(cfg.seed, 1)
        net, _ = train_dqn(cfg, env_spec(cfg), Run(cfg, run_dir=str(tmp_path / f"r{i}")), False, probe=probe)
        nets.append(copy.deepcopy(net.state_dict()))
    assert len(probe.rows) == 3
    for k in nets[0]:
        assert torch.equal(nets[0][k], nets[1][k]), k


def test_quick_sweep_json(tmp_path):
    res = oe.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "overestimation.json").read_text())
    assert data["runs"] == res["runs"]
    assert {(r["env"], r["algo"]) for r in data["runs"]} == {
        (e, a) for e in ("CartPole-v1", "Acrobot-v1") for a in ("dqn", "double_dqn")}
    for r in data["runs"]:
        assert r["horizon"] == 500 and r["probes"]
        for p in r["probes"]:
            assert math.isfinite(p["q"]) and math.isfinite(p["mc"])
            # true returns lie within the reward range's discounted bounds
            lo, hi = (0.0, 1 / (1 - GAMMA)) if r["env"] == "CartPole-v1" else (-1 / (1 - GAMMA), 0.0)
            assert lo - TOL <= p["mc"] <= hi + TOL
    assert (tmp_path / "overestimation.png").stat().st_size > 0
