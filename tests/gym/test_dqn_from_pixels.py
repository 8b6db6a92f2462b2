"""DQN from pixels: the CNN Q-networks' shapes and sizes, uint8 frames
through the env, the replay buffer (round trip, frame sharing, memory) and training, the
refusals of what cannot train on images, and smoke runs on MinAtar and a real Atari game."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf.config import load_recipe
from rlhf.errors import UserError
from rlhf.gym.policies import MinAtarCNN, NatureCNN, QNetwork
from rlhf.gym.replay import ReplayBuffer

ROOT = Path(__file__).resolve().parents[2]
FRAME = 84 * 84


def nature_param_count(c: int, a: int) -> int:
    """By hand: conv weights + biases, 7x7x64 = 3136 -> 512 FC, 512 -> A head."""
    return (c * 32 * 8 * 8 + 32) + (32 * 64 * 4 * 4 + 64) + (64 * 64 * 3 * 3 + 64) + (3136 * 512 + 512) + (512 * a + a)


# --- networks ------------------------------------------------------------------------------

def test_nature_cnn_map_sizes_and_parameter_count():
    torso = NatureCNN((4, 84, 84))
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    maps = []
    h = x.float()
    for layer in torso.convs:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            maps.append(tuple(h.shape[1:]))
    # (84 - 8) / 4 + 1 = 20, (20 - 4) / 2 + 1 = 9, 9 - 3 + 1 = 7 (Mnih et al. 2015)
    assert maps == [(32, 20, 20), (64, 9, 9), (64, 7, 7)] and h.shape == (2, 3136)
    q = QNetwork((4, 84, 84), 6, network="nature_cnn")
    assert q(x).shape == (2, 6) and q(x).dtype == torch.float32
    assert sum(p.numel() for p in q.parameters()) == nature_param_count(4, 6) == 1_687_206
    dueling = QNetwork((4, 84, 84), 6, network="nature_cnn", dueling=True)
    assert dueling(x).shape == (2, 6)
    assert sum(p.numel() for p in dueling.parameters()) == nature_param_count(4, 6) + 512 + 1  # + V head


def test_minatar_cnn_shapes():
    torso = MinAtarCNN((4, 10, 10))
    assert torso.fc.in_features == 16 * 8 * 8  # one 3x3 conv, stride 1, no padding: 10 -> 8
    for dueling in (False, True):
        q = QNetwork((4, 10, 10), 3, network="minatar_cnn", obs_high=1.0, dueling=dueling)
        assert q(torch.randint(0, 2, (5, 4, 10, 10), dtype=torch.uint8)).shape == (5, 3)


def test_cnn_scales_integers_to_unit_range_inside():
    """The same weights see the same [0, 1] input whether frames are 0/255 (Atari, obs_high 255)
    or 0/1 (MinAtar, obs_high 1). x * (1/255) for x = 255 is 1 within one float32 rounding
    (relative 6e-8), which moves the output by a relative ~1e-7: 1e-5 holds on any CPU."""
    torch.manual_seed(0)
    a = QNetwork((4, 10, 10), 3, network="minatar_cnn", obs_high=255.0)
    b = QNetwork((4, 10, 10), 3, network="minatar_cnn", obs_high=1.0)
    b.load_state_dict(a.state_dict())
    bits = torch.randint(0, 2, (6, 4, 10, 10), dtype=torch.uint8)
    torch.testing.assert_close(a(bits * 255), b(bits), rtol=1e-5, atol=1e-6)
    # and uint8 in equals the float of the scaled frame in: the scaling is the only conversion
    torch.testing.assert_close(b(bits), b(bits.float()), rtol=0, atol=0)


def test_dueling_cnn_head_is_value_plus_centred_advantage():
    torch.manual_seed(1)
    q = QNetwork((4, 10, 10), 4, network="minatar_cnn", obs_high=1.0, dueling=True)
    x = torch.randint(0, 2, (3, 4, 10, 10), dtype=torch.uint8)
    h = q.body(x)
    adv = q.adv_head(h)
    expect = q.value_head(h) + adv - adv.mean(-1, keepdim=True)
    torch.testing.assert_close(q(x), expect, rtol=0, atol=0)  # the same ops in the same order
    # mean over actions of Q is V (float32 sums of 4 numbers: a few ulps)
    torch.testing.assert_close(q(x).mean(-1), q.value_head(h).squeeze(-1), rtol=1e-5, atol=1e-6)


# --- replay buffer ---------------------------------------------------------------------------

def _stacks(n: int, rng, frame_shape=(84, 84)) -> tuple[np.ndarray, np.ndarray]:
    """n consecutive 4-frame stacks and their successors from one stream of frames; frame i's
    first two pixels spell i, so a sampled row says which transition it is."""
    frames = rng.integers(0, 256, (n + 4, *frame_shape), dtype=np.uint8)
    frames[:, 0, 0], frames[:, 0, 1] = np.arange(n + 4) % 256, np.arange(n + 4) // 256
    obs = np.stack([frames[i:i + 4] for i in range(n)])
    nxt = np.stack([frames[i + 1:i + 5] for i in range(n)])
    return obs, nxt


def _which(obs: torch.Tensor) -> np.ndarray:
    return (obs[:, 0, 0, 0].long() + 256 * obs[:, 0, 0, 1].long()).numpy()


def test_uint8_frame_stacked_round_trip_and_memory():
    rng = np.random.default_rng(0)
    n, cap = 300, 128
    obs, nxt = _stacks(n, rng)
    buf = ReplayBuffer(cap, (4, 84, 84), (), torch.long, obs_dtype=np.uint8, frame_stacked=True)
    # per transition: the 4-frame stack, the successor's newest frame, action int64, reward and
    # terminated float32: 5 * 7056 + 8 + 4 + 4 = 35,296 bytes (the docs' figure)
    assert buf.nbytes() == cap * (5 * FRAME + 16) and 5 * FRAME + 16 == 35_296
    assert buf.obs.dtype == buf.next_obs.dtype == torch.uint8 and buf.next_obs.shape == (cap, 1, 84, 84)
    for start in range(0, n, 2):  # batches of two envs' transitions; the ring wraps twice
        sl = slice(start, start + 2)
        buf.add(obs[sl], np.array([1, 2]), np.array([0.5, -1.0], np.float32), nxt[sl], np.zeros(2, np.float32))
    assert buf.size == cap and buf.pos == n % cap
    o, a, r, o2, d = buf.sample(512)
    assert o.dtype == o2.dtype == torch.uint8 and o2.shape == (512, 4, 84, 84)
    i = _which(o)
    assert i.min() >= n - cap  # only the newest `capacity` transitions survive
    np.testing.assert_array_equal(o.numpy(), obs[i])  # bit for bit
    np.testing.assert_array_equal(o2.numpy(), nxt[i])  # rebuilt from the shifted stack + new frame
    np.testing.assert_array_equal(a.numpy(), np.where(i % 2 == 0, 1, 2))


def test_uint8_unstacked_round_trip_and_memory():
    rng = np.random.default_rng(1)
    obs = rng.integers(0, 2, (50, 4, 10, 10), dtype=np.uint8)
    nxt = rng.integers(0, 2, (50, 4, 10, 10), dtype=np.uint8)
    buf = ReplayBuffer(100, (4, 10, 10), (), torch.long, obs_dtype=np.uint8)
    assert buf.nbytes() == 100 * (2 * 400 + 16)  # MinAtar Breakout: 816 bytes a transition
    buf.add(obs, np.zeros(50), np.arange(50, dtype=np.float32), nxt, np.zeros(50, np.float32))
    o, _, r, o2, _ = buf.sample(200)
    i = r.long().numpy()  # the reward is the row's index here
    np.testing.assert_array_equal(o.numpy(), obs[i])
    np.testing.assert_array_equal(o2.numpy(), nxt[i])


def test_frame_stacked_buffer_refuses_a_successor_that_is_not_a_shift():
    rng = np.random.default_rng(2)
    obs, nxt = _stacks(1, rng, (8, 8))
    nxt[0, 0] += 1
    buf = ReplayBuffer(4, (4, 8, 8), (), torch.long, obs_dtype=np.uint8, frame_stacked=True)
    with pytest.raises(UserError, match="not the previous stack shifted by one frame"):
        buf.add(obs, np.zeros(1), np.zeros(1, np.float32), nxt, np.zeros(1, np.float32))


def test_flat_buffer_unchanged():
    buf = ReplayBuffer(10, 4, (), torch.long)
    assert buf.obs.dtype == torch.float32 and buf.obs.shape == (10, 4) and buf.nbytes() == 10 * (2 * 16 + 16)


# --- envs, refusals, training ---------------------------------------------------------------

def _cfg(**over):
    vals = [f"{k}={v}" for k, v in over.items()]
    return load_recipe(str(ROOT / "recipes" / "dqn_minatar_breakout.yaml"), vals)


def test_minatar_env_gives_channels_first_uint8():
    pytest.importorskip("minatar")
    from rlhf.gym.common import env_spec
    from rlhf.gym.envs import VecEnv

    env = VecEnv("MinAtar/Breakout-v1", 2, 0)
    assert env.obs.shape == (2, 4, 10, 10) and env.obs.dtype == np.uint8 and set(np.unique(env.obs)) <= {0, 1}
    _, _, _, _, nxt = env.step(np.array([0, 1]))
    assert nxt.dtype == np.uint8
    env.close()
    spec = env_spec(_cfg())
    assert spec["obs_shape"] == [4, 10, 10] and spec["obs_high"] == 1.0 and spec["frame_stacked"] is False


@pytest.mark.parametrize("over, match", [
    ({"algo": "ppo"}, "ppo reads flat observations"),
    ({"network": "mlp"}, "set network: nature_cnn"),
    ({"norm_obs": "true"}, "norm_obs does not apply to the images"),
    ({"network": "nature_cnn"}, "at least 36x36"),
    ({"save_every": 1000}, "save_every .resumable checkpoints. cannot save the state of MinAtar/Breakout-v1 "
                           ".BaseEnv.game is not plain data."),
])
def test_image_settings_that_cannot_train_are_refused(over, match):
    pytest.importorskip("minatar")
    from rlhf.preflight import preflight

    with pytest.raises(UserError, match=match):
        preflight(_cfg(**over))


def test_cnn_on_flat_observations_and_cuda_elsewhere_are_refused():
    from rlhf.gym.common import env_spec

    cfg = load_recipe(str(ROOT / "recipes" / "dqn_cartpole.yaml"), ["network=nature_cnn"])
    with pytest.raises(UserError, match="network nature_cnn reads images"):
        env_spec(cfg)
    with pytest.raises(UserError, match="supported by algo dqn only"):
        load_recipe(str(ROOT / "recipes" / "ppo_cartpole.yaml"), ["device=cuda"])


def test_missing_package_is_one_sentence(monkeypatch):
    import builtins

    from rlhf.gym.envs import make_env

    real = builtins.__import__

    def no_minatar(name, *args, **kwargs):
        if name.startswith("minatar"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minatar)
    with pytest.raises(UserError, match=r"needs the minatar package.*rlhf\[minatar\]"):
        make_env("MinAtar/NoSuchGame-v1")


def test_dqn_trains_saves_and_evaluates_on_minatar(tmp_path):
    """A few hundred steps through the whole `rlhf train` path: uint8 replay, CNN updates, the
    safetensors policy reloaded by `rlhf eval`'s loader, greedy evaluation on images."""
    pytest.importorskip("minatar")
    from rlhf.gym.common import load_agent
    from rlhf.gym.evaluate import evaluate_agent
    from rlhf.run import Run
    from rlhf.trainers.gym import train

    cfg = _cfg(total_steps=300, learning_starts=100, buffer_size=500, target_update=50, eval_episodes=2,
               log_every=100, out_dir=str(tmp_path), dueling="true", double="true")
    before = QNetwork((4, 10, 10), 3, network="minatar_cnn", obs_high=1.0, dueling=True)
    torch.manual_seed(cfg.seed)
    result = train(cfg, Run(cfg, run_dir=str(tmp_path / "run")), progress=False)
    assert result["steps"] == 300 and result["replay_mb"] == round(500 * 816 / 2**20, 1)
    assert np.isfinite(result["eval_mean_return"])
    agent = load_agent(str(tmp_path / "run"), cfg)
    assert isinstance(agent.body, MinAtarCNN)
    moved = any(not torch.equal(p, q) for p, q in zip(agent.state_dict().values(), before.state_dict().values()))
    assert moved  # (different init or trained: either way the file holds a real network)
    assert np.isfinite(evaluate_agent(agent, cfg, 1)["mean_return"])


def test_quick_benchmark_runs(tmp_path):
    pytest.importorskip("minatar")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seeds" / "dqn_pixels.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "dqn_pixels.json").read_text())
    assert [r["step"] for r in res["curve"]] == [1, 200, 400, 600]  # initial weights, then every 200
    assert res["train"]["steps"] == 600 and res["network"] == "minatar_cnn"
    assert all(np.isfinite(r["mean"]) for r in res["curve"]) and res["random"]["episodes"] == 3
    assert (tmp_path / "dqn_pixels.png").is_file()


# --- a real Atari game ----------------------------------------------------------------------

def _atari_or_skip():
    pytest.importorskip("ale_py", reason="ale-py (the atari extra) is not installed")
    pytest.importorskip("cv2", reason="opencv (the atari extra) is not installed")
    from rlhf.gym.envs import make_env

    try:
        return make_env("ALE/Pong-v5")
    except UserError as exc:  # a build of ale-py without the Pong ROM
        pytest.skip(f"the Pong ROM is not available: {exc}")


def test_atari_pipeline_gives_stacked_84x84_uint8_frames():
    env = _atari_or_skip()
    from rlhf.gym.envs import is_frame_stack

    assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
    assert is_frame_stack(env)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):  # each successor is the stack shifted by one frame: what the buffer relies on
        nxt, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        np.testing.assert_array_equal(nxt[:-1], obs[1:])
        obs = nxt
    env.close()


def test_dqn_smoke_on_atari_pong(tmp_path):
    _atari_or_skip().close()
    from rlhf.gym.common import env_spec
    from rlhf.run import Run
    from rlhf.trainers.dqn import train_dqn

    cfg = load_recipe(str(ROOT / "recipes" / "dqn_atari_pong.yaml"),
                      ["device=cpu", "total_steps=160", "learning_starts=128", "buffer_size=200", "batch_size=8",
                       "log_every=80", "threads=1"])
    spec = env_spec(cfg)
    assert spec["obs_shape"] == [4, 84, 84] and spec["frame_stacked"] is True and spec["act_dim"] == 6
    qnet, summary = train_dqn(cfg, spec, Run(cfg, run_dir=str(tmp_path / "run")), progress=False)
    assert summary["steps"] == 160 and summary["replay_mb"] == round(200 * 35_296 / 2**20, 1)
    assert isinstance(qnet.net[0], NatureCNN)
