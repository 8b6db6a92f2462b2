"""The seed-document experiments (benchmarks/seeds/, docs/seeds.md): each script's --quick mode
runs end to end and its JSON says what it should; their losses and score normaliser are checked
against hand-computed values."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "benchmarks" / "seeds"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"seeds_{name}", SEEDS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, out: Path, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SEEDS / f"{name}.py"), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


# --- classification as one-step RL -----------------------------------------------------------

def test_classification_quick_trains_every_loss(tmp_path):
    pytest.importorskip("sklearn")
    cls = load("classification")
    res = run_quick("classification", tmp_path / "c.json")
    assert set(res["summary"]) == set(cls.LOSSES)
    assert res["data"] == {"name": "sklearn digits", "train": 1437, "test": 360}
    for row in res["rows"]:
        assert len(row["curve"]) == 2 and 0.0 <= row["test_acc"] <= 1.0
    acc = {r["loss"]: r["test_acc"] for r in res["rows"]}
    # two epochs lift every loss far above chance (0.1): ~0.85 (cross-entropy, Q-learning),
    # ~0.45 (REINFORCE) on seed 0; the margins dwarf any CPU's summation-order differences
    assert acc["cross_entropy"] > 0.5 and acc["q_full"] > 0.5 and acc["q_bandit"] > 0.5
    assert acc["reinforce"] > 0.2


def test_classification_losses_match_hand_formulas():
    cls = load("classification")
    torch.manual_seed(0)
    out = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    gen = torch.Generator().manual_seed(0)
    ce, _ = cls.loss_fn("cross_entropy", out, y, 0.0, gen)
    # -log softmax(out)[y], averaged: the same arithmetic in another order, float64
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-12)
    q_full, _ = cls.loss_fn("q_full", out, y, 0.0, gen)
    one_hot = torch.nn.functional.one_hot(y, 4).double()
    assert q_full.item() == pytest.approx((0.5 * (out - one_hot) ** 2).sum(1).mean().item(), rel=1e-12)
    # epsilon 0: the greedy action's Q regressed to its reward (1 only where argmax == label)
    q_bandit, reward = cls.loss_fn("q_bandit", out, y, 0.0, gen)
    greedy = out.argmax(1)
    r = (greedy == y).double()
    assert q_bandit.item() == pytest.approx((0.5 * (out.gather(1, greedy[:, None]).squeeze(1) - r) ** 2).mean().item(),
                                            rel=1e-12)
    assert reward == pytest.approx(r.mean().item())


def test_classification_reinforce_gradient_is_leave_one_out_policy_gradient():
    """With the sampled labels fixed, the loss's gradient wrt the logits is
    -(1/B) sum_i (r_i - mean_{j!=i} r_j) (onehot(a_i) - softmax_i), computed by hand here."""
    cls = load("classification")
    torch.manual_seed(1)
    out = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = cls.loss_fn("reinforce", out, y, 0.0, torch.Generator().manual_seed(5))
    loss.backward()
    # replay the same draws: the loss samples with sample_categorical from this generator state
    from rlhf.core import sample_categorical

    a = sample_categorical(torch.softmax(out.detach(), -1), generator=torch.Generator().manual_seed(5))
    r = (a == y).float()
    # the script's rewards are float32: the same two roundings (/5, then the difference) here;
    # the sums of 0/1 are exact, so the advantages match bit for bit
    adv = (r - (r.sum() - r) / (len(r) - 1)).double()
    expect = -(adv[:, None] * (torch.nn.functional.one_hot(a, 3).double() - torch.softmax(out.detach(), -1))) / 6
    torch.testing.assert_close(out.grad, expect, rtol=1e-10, atol=1e-12)


# --- the PPO paper's surrogate table -----------------------------------------------------------

def test_ppo_surrogates_quick_runs_all_eleven_settings(tmp_path):
    pytest.importorskip("gymnasium")
    ppo = load("ppo_surrogates")
    res = run_quick("ppo_surrogates", tmp_path / "p.json", "--runs-dir", str(tmp_path / "runs"))
    labels = [label for label, _, _ in ppo.SETTINGS]
    assert sorted(r["setting"] for r in res["rows"]) == sorted(labels)  # each exactly once
    assert set(res["summary"]) == set(labels) | {"excluded"}
    assert math.isfinite(res["random"]["Pendulum-v1"])
    for row in res["rows"]:
        assert row["steps"] == 1024 and row["curve"]
        assert math.isfinite(row["score"]) and math.isfinite(row["eval_return"])
        # two updates may not beat random yet: then Pendulum is left out of the means, loudly
        mean = res["summary"][row["setting"]]["mean"]
        assert (mean is None) == ("Pendulum-v1" in res["summary"]["excluded"])
        assert mean is None or math.isfinite(mean)
        # the overrides reached the trainer: the run's resolved recipe holds the setting
        recipe = yaml.safe_load((Path(row["run_dir"]) / "recipe.yaml").read_text())
        over = next(o for lbl, _, o in ppo.SETTINGS if lbl == row["setting"])
        for key, value in over.items():
            assert recipe[key] == value, (row["setting"], key)
        if over["objective"] == "kl_penalty":  # a fixed beta stays put (no clipping: beta 0)
            assert row["final_kl_beta"] == over["penalty_coef"]
        if over["objective"] == "adaptive_kl":  # the controller only halves or doubles beta = 1
            assert math.log2(row["final_kl_beta"]) == round(math.log2(row["final_kl_beta"]))
    assert res["spearman_vs_paper"] is None or -1.0 <= res["spearman_vs_paper"] <= 1.0


def test_ppo_surrogates_normalisation_by_hand():
    """Random 0, best setting's seed-mean 1, per env; then the mean over envs and seeds."""
    ppo = load("ppo_surrogates")
    a, b = ppo.SETTINGS[0][0], ppo.SETTINGS[1][0]
    rows = [  # env X: random 10, a = {20, 40} (mean 30 = best), b = {15}
        {"env": "X", "setting": a, "score": 20.0}, {"env": "X", "setting": a, "score": 40.0},
        {"env": "X", "setting": b, "score": 15.0},
        # env Y: random -100, b = {-50} (best), a = {-75}
        {"env": "Y", "setting": a, "score": -75.0}, {"env": "Y", "setting": b, "score": -50.0},
    ]
    s = ppo.normalise(rows, {"X": 10.0, "Y": -100.0})
    # X scale 20: a -> 0.5, 1.5 (seed-mean 1), b -> 0.25; Y scale 50: b -> 1, a -> 0.5
    assert s[a]["per_env"] == {"X": pytest.approx(1.0), "Y": pytest.approx(0.5)}
    assert s[b]["per_env"] == {"X": pytest.approx(0.25), "Y": pytest.approx(1.0)}
    assert s[a]["mean"] == pytest.approx((0.5 + 1.5 + 0.5) / 3) and s[a]["n"] == 3
    assert s[b]["mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert s[ppo.SETTINGS[2][0]]["mean"] is None and s["excluded"] == []
    assert s[a]["raw"] == {"X": 30.0, "Y": -75.0}
    # an env where nothing beats random has no scale: left out, and said so
    s = ppo.normalise(rows + [{"env": "Z", "setting": a, "score": 1.0}], {"X": 10.0, "Y": -100.0, "Z": 5.0})
    assert s["excluded"] == ["Z"] and s[a]["per_env"]["Z"] is None
    assert s[a]["mean"] == pytest.approx((0.5 + 1.5 + 0.5) / 3) and s[a]["n"] == 3


def test_ppo_surrogates_rank_agreement_by_hand():
    ppo = load("ppo_surrogates")
    # ties share their mean rank: [3, 1, 3] -> [1.5, 0, 1.5]
    assert list(ppo._ranks(__import__("numpy").array([3.0, 1.0, 3.0]))) == [1.5, 0.0, 1.5]
    paper = {label: p for label, p, _ in ppo.SETTINGS}
    assert ppo.rank_agreement({k: {"mean": v} for k, v in paper.items()}) == pytest.approx(1.0)
    assert ppo.rank_agreement({k: {"mean": -v} for k, v in paper.items()}) == pytest.approx(-1.0)


def test_paper_mujoco_recipe_loads_with_the_papers_settings():
    from rlhf.config import load_recipe

    cfg = load_recipe(str(ROOT / "recipes" / "ppo_mujoco.yaml"))
    assert (cfg.algo, cfg.n_envs, cfg.n_steps, cfg.epochs, cfg.minibatches) == ("ppo", 1, 2048, 10, 32)
    assert (cfg.lr, cfg.gamma, cfg.gae_lambda, cfg.ent_coef, cfg.max_grad_norm) == (3e-4, 0.99, 0.95, 0.0, 0.0)
