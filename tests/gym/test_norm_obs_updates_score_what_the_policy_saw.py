"""Gym PPO/TRPO with ``norm_obs``: the update scores the observations the policy acted on
(normalised with the statistics of that moment), so before the first gradient step of each
update the ratio is 1 and approx_kl / clip fraction read 0."""
import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

import rlhf.trainers.on_policy as on_policy  # noqa: E402
from rlhf.cli import main  # noqa: E402
from rlhf.gym.config import GymConfig  # noqa: E402
from rlhf.gym.envs import RewardScaler, VecEnv  # noqa: E402
from rlhf.gym.policies import ActorCritic  # noqa: E402

# float32 k3 = exp(d) - 1 - d with |d| <~ 1e-5 (NumPy sampler vs torch loss, the same float32
# weights): exp(d) rounds to within one ulp of 1 (1.2e-7), so each row's estimate, and their
# mean, is within ~1.2e-7 of the true ~d^2/2 < 1e-10; two ulps bound it on any CPU.
TWO_ULPS = 2.4e-7


@pytest.mark.parametrize("recipe", ["ppo_pendulum", "ppo_acrobot"])
def test_norm_obs_ppo_ratio_is_one_at_the_first_minibatch(recipe, tmp_path, monkeypatch, capsys):
    seen = []
    real, get = on_policy.UPDATES.get("ppo"), on_policy.UPDATES.get  # the update rule the trainer looks up
    spy = lambda self, b, clip: seen.append(real(self, b, clip)) or seen[-1]  # noqa: E731
    monkeypatch.setattr(on_policy.UPDATES, "get", lambda algo: spy if algo == "ppo" else get(algo))
    args = ["train", f"recipes/{recipe}.yaml", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for item in ("n_envs=4", "n_steps=64", "total_steps=1536", "log_every=512", "eval_episodes=1", "norm_obs=true"):
        args += ["--set", item]
    assert main(args) == 0
    assert len(seen) >= 5  # several rollouts: the normaliser moved between and within them
    for stats in seen:
        assert abs(float(stats["approx_kl_first"])) <= TWO_ULPS
        assert float(stats["clip_frac_first"]) == 0.0
        # the later minibatches did move the policy: the first one's 0 is not a dead statistic
        assert float(stats["approx_kl"]) > 10 * TWO_ULPS


def test_norm_obs_kl_after_update_is_zero_without_a_step(tmp_path, monkeypatch):
    """The adaptive-KL controller's input scores the stored (already normalised) rows with the
    actor alone: with lr 1e-12 the policy barely moves (Adam steps of ~1e-12 per weight: a KL of
    ~1e-20), so KL(pi_old || pi) is 0 up to float32 rounding. Normalising the rows a second time would read a KL of the normaliser instead."""
    seen = []
    real = on_policy.Updater.kl_after_update
    monkeypatch.setattr(on_policy.Updater, "kl_after_update", lambda self, b: seen.append(real(self, b)) or seen[-1])
    args = ["train", "recipes/ppo_pendulum.yaml", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for item in ("n_envs=2", "n_steps=128", "total_steps=768", "log_every=256", "eval_episodes=1", "lr=1e-12", "norm_obs=true",
                 "objective=adaptive_kl", "target_kl=0.01", "lr_schedule=constant"):
        args += ["--set", item]
    assert main(args) == 0
    assert len(seen) >= 2 and all(abs(float(kl)) <= TWO_ULPS for kl in seen)


def test_norm_obs_batch_holds_the_normalised_observations_acted_on():
    """collect's rows are norm(obs) under the statistics at act time: the sampler's log-probs
    are the torch policy's log-probs of those rows, with no normaliser in between."""
    cfg = GymConfig(env="Pendulum-v1", n_envs=2, n_steps=210, norm_obs=True)  # Pendulum truncates at 200
    torch.manual_seed(0)
    env = VecEnv(cfg.env, cfg.n_envs, 0)
    pol = ActorCritic(3, 1, discrete=False, norm_obs=True, log_std_init=-0.5)
    b = on_policy.collect(cfg, env, pol, RewardScaler(2, cfg.gamma, False), np.random.default_rng(0))
    env.close()
    with torch.no_grad():
        logp = pol.log_prob(pol.actor(b.obs), b.actions)
    torch.testing.assert_close(logp, b.logp, atol=1e-5, rtol=1e-5)  # NumPy vs torch float32 rounding
    assert float(pol.obs_norm.count) > 400  # the statistics moved during the rollout


def test_norm_obs_dqn_target_is_the_online_q_function_at_the_last_copy(tmp_path, monkeypatch, capsys):
    """The target network is a snapshot of the online network, normaliser included: at every
    update its weights *and* statistics are those the online network had at the end of some
    earlier update phase (the copy happens there), never newer statistics on older weights."""
    import rlhf.trainers.dqn as dqn

    def fingerprint(net):
        return tuple(float(v.double().sum()) for v in net.state_dict().values())

    online_states, checks = set(), []
    real = dqn.dqn_update

    def spy(cfg, qnet, target, opt, batch):
        if not online_states:
            online_states.add(fingerprint(target))  # the initial deepcopy
        checks.append((fingerprint(target) in online_states, float(target.obs_norm.count), float(qnet.obs_norm.count)))
        loss = real(cfg, qnet, target, opt, batch)
        online_states.add(fingerprint(qnet))
        return loss

    monkeypatch.setattr(dqn, "dqn_update", spy)
    args = ["train", "recipes/dqn_acrobot.yaml", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for item in ("norm_obs=true", "total_steps=400", "learning_starts=50", "target_update=100", "eval_episodes=1",
                 "log_every=200", "hidden=32"):
        args += ["--set", item]
    assert main(args) == 0
    assert all(snapshot for snapshot, _, _ in checks)
    # copies did carry statistics (count > the initial 1e-4), and the online ones moved on after them
    assert any(1 < t < q for _, t, q in checks)


def test_norm_obs_sac_is_refused():
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="norm_obs is not supported by sac"):
        GymConfig(algo="sac", env="Pendulum-v1", norm_obs=True).validate()
