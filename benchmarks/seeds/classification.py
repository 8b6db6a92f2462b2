"""Classification as one-step RL (seed 000, "An Invitation to Deep RL", sections 3.1-3.2).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/seeds/classification.py          # full
    PYTHONPATH=$PWD python benchmarks/seeds/classification.py --quick --out /tmp/c.json

An image is the state, the predicted label the action, and the reward is 1 for the right
label, 0 otherwise. One network (the same MLP, the same initialisation per seed, the same Adam
optimiser and batches) is trained by four losses, each built from ``rlhf.core``:

- ``cross_entropy``: ``policy_loss(log pi(y|x), adv=1, objective="reinforce")``, i.e. -log pi(y|x):
  the gradient of log expected accuracy (section 3.2.1), with the label given.
- ``q_bandit``: Q-learning of the one-step reward. An action is chosen epsilon-greedily from
  Q(x, .) (``linear_schedule`` decays epsilon), its target is ``td_target`` with the episode
  terminated (= the reward), and ``value_loss`` regresses only the taken action's Q-value.
  Prediction: argmax_a Q(x, a). Only the reward of one action is seen, never the label.
- ``reinforce``: a label is sampled from pi(.|x) (``sample_categorical``); reward 1 if right;
  advantage = reward minus the leave-one-out mean reward of the minibatch (``leave_one_out``);
  ``policy_loss(objective="reinforce")``. Prediction: argmax pi. Never sees the label either.
- ``q_full``: the seed's own CIFAR-10 Q-learning setting (section 3.1.3): the rewards of all
  actions are known (one-hot), so ``value_loss`` regresses every Q-value: supervised learning
  with MSE, "the only change necessary".

Data: scikit-learn's digits (1797 8x8 images, 10 classes; ships inside the wheel, no
download). CIFAR-10 is not shipped by any PyPI package we found (they download it at run time,
which this machine cannot), and a CNN on it would not fit this CPU budget anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhf.core import leave_one_out, policy_loss, sample_categorical, value_loss
from rlhf.core.value_learning import linear_schedule, td_target

ROOT = Path(__file__).resolve().parents[2]
LOSSES = ("cross_entropy", "q_bandit", "reinforce", "q_full")
FULL = {"seeds": [0, 1, 2, 3, 4], "epochs": 50}
QUICK = {"seeds": [0], "epochs": 2}
HIDDEN, LR, BATCH = 128, 1e-3, 32
EPS_START, EPS_END, EPS_FRACTION = 1.0, 0.05, 0.2  # q_bandit's exploration schedule


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0):
    """Digits scaled to [0, 1], one fixed stratified train/test split for every seed and loss."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=test_fraction, random_state=split_seed,
                                              stratify=y)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return f(x_tr), g(y_tr), f(x_te), g(y_te)


def make_net(n_in: int, n_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, n_out))


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor, eps: float, gen: torch.Generator) -> tuple:
    """The minibatch loss of one method and the mean reward of the actions it took.
    out: [B, K] network outputs (logits for policies, Q-values for value methods); y: [B]."""
    n, k = out.shape
    if name == "cross_entropy":
        logp = torch.log_softmax(out, -1).gather(1, y[:, None]).squeeze(1)
        loss, _ = policy_loss(logp, torch.ones(n), objective="reinforce")
        return loss, float((out.argmax(1) == y).float().mean())
    if name == "reinforce":
        logp_all = torch.log_softmax(out, -1)
        with torch.no_grad():
            actions = sample_categorical(logp_all.detach().exp(), generator=gen)
        reward = (actions == y).float()
        adv = leave_one_out(reward, n)  # baseline: the other samples' mean reward (unbiased)
        logp = logp_all.gather(1, actions[:, None]).squeeze(1)
        loss, _ = policy_loss(logp, adv, objective="reinforce")
        return loss, float(reward.mean())
    if name == "q_bandit":
        greedy = out.detach().argmax(1)
        explore = torch.rand(n, generator=gen) < eps
        actions = torch.where(explore, torch.randint(0, k, (n,), generator=gen), greedy)
        reward = (actions == y).float()
        # one step, then the episode ends: the TD target is the reward itself
        target = td_target(reward, torch.zeros(n, k), torch.ones(n), gamma=0.99)
        q_taken = out.gather(1, actions[:, None]).squeeze(1)
        return value_loss(q_taken, target).mean(), float(reward.mean())
    if name == "q_full":
        one_hot = torch.nn.functional.one_hot(y, k).float()  # every action's reward, known
        return value_loss(out, one_hot).sum(1).mean(), float((out.argmax(1) == y).float().mean())
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


def train_one(name: str, seed: int, epochs: int, data) -> dict:
    x_tr, y_tr, x_te, y_te = data
    net = make_net(x_tr.shape[1], 10, seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)  # minibatch order and action sampling
    steps_per_epoch = len(x_tr) // BATCH
    total, step = epochs * steps_per_epoch, 0
    curve, t0 = [], time.process_time()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_tr), generator=gen)
        rewards = []
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            eps = linear_schedule(EPS_START, EPS_END, EPS_FRACTION, step / total)
            loss, r = loss_fn(name, net(x_tr[idx]), y_tr[idx], eps, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rewards.append(r)
            step += 1
        with torch.no_grad():
            acc = float((net(x_te).argmax(1) == y_te).float().mean())
        curve.append({"epoch": epoch, "test_acc": acc, "train_reward": float(np.mean(rewards))})
    return {"loss": name, "seed": seed, "epochs": epochs, "test_acc": curve[-1]["test_acc"],
            "best_test_acc": max(c["test_acc"] for c in curve), "curve": curve,
            "cpu_s": round(time.process_time() - t0, 2)}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in LOSSES:
        accs = [r["test_acc"] for r in rows if r["loss"] == name]
        if accs:
            out[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
    return out


def table(summary: dict) -> str:
    lines = ["| loss | final test accuracy (mean +- std over seeds) | seeds |", "| --- | --- | --- |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {100 * s['mean']:.2f}% +- {100 * s['std']:.2f} | {s['n']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in LOSSES:
        curves = np.array([[c["test_acc"] for c in r["curve"]] for r in rows if r["loss"] == name])
        if not len(curves):
            continue
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(epochs, 100 * mean, label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(50, 100)
    ax.set_title("Digits: cross-entropy vs Q-learning vs REINFORCE (mean +- std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs: a smoke test")
    ap.add_argument("--seeds", nargs="*", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/seeds/results/classification.json"))
    ap.add_argument("--plot", help="write the learning curves here (PNG)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plan = dict(QUICK if args.quick else FULL)
    plan.update({k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v})
    data = load_digits_split()
    rows = []
    for seed in plan["seeds"]:
        for name in LOSSES:
            row = train_one(name, seed, plan["epochs"], data)
            rows.append(row)
            print(f"{name} seed {seed}: test accuracy {100 * row['test_acc']:.2f}% (cpu {row['cpu_s']:.1f}s)",
                  file=sys.stderr, flush=True)
    summary = summarise(rows)
    result = {"plan": plan, "data": {"name": "sklearn digits", "train": len(data[0]), "test": len(data[2])},
              "hyper": {"hidden": HIDDEN, "lr": LR, "batch": BATCH,
                        "eps": [EPS_START, EPS_END, EPS_FRACTION]},
              "summary": summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(summary))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
