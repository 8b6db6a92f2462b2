"""Module modes of the LM trainer's phases, through the real trainer step on
the tiny model: sampling, the reference pass and the old-log-prob pass run in eval mode; the
update runs without dropout unless ``disable_dropout: false``; gradient checkpointing really
recomputes; the ratio is exactly 1 at the first minibatch with ``lora_dropout > 0``."""
import json
from collections import defaultdict

import pytest
import torch

import rlhf.trainers.lm as lm
from rlhf.cli import main
from rlhf.distributed import Dist
from rlhf.lm.policy import LMPolicy
from rlhf.tasks import arith_row

TINY = ["rewards=[arith_correct, length_penalty]", "prompts_per_step=2", "group_size=2", "max_new_tokens=4",
        "eval_problems=4", "lora_r=2", "lora_alpha=4"]


def _sets(*items):
    return [x for item in items for x in ("--set", item)]


def _groups(policy: LMPolicy) -> dict[str, list[torch.nn.Module]]:
    """The modules whose mode we record, by kind."""
    from peft.tuners.lora.layer import LoraLayer

    base = policy.model.get_base_model()
    layers = list(base.model.layers)
    lora_dropout = [d for m in policy.model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]
    return {"layer": layers, "attn": [layer.self_attn for layer in layers], "mlp": [layer.mlp for layer in layers],
            "lm": [base, base.model], "lora_dropout": lora_dropout,
            "value_head": [policy.value_head] if policy.value_head is not None else []}


@pytest.fixture
def recorder(monkeypatch):
    """Runs the CLI with hooks on the policy's modules: ``calls[phase][kind]`` lists the
    ``training`` flag of each forward call; phases: sample, reference, old, update, backward."""
    calls: dict = defaultdict(lambda: defaultdict(list))
    phase = ["setup"]

    def labelled(label_of, fn):
        def wrapped(*args, **kwargs):
            prev, phase[0] = phase[0], label_of(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = prev
        return wrapped

    def forward_label(self, batch, adapter=True, **kw):
        return "reference" if not adapter else "update" if torch.is_grad_enabled() else "old"

    class Hooked(LMPolicy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for kind, modules in _groups(self).items():
                for m in modules:
                    m.register_forward_pre_hook(
                        lambda mod, _args, kind=kind: calls[phase[0]][kind].append(mod.training))
            assert _groups(self)["lora_dropout"], "no LoRA dropout modules to watch"

    monkeypatch.setattr(Hooked, "generate", labelled(lambda *a, **k: "sample", LMPolicy.generate))
    monkeypatch.setattr(Hooked, "forward", labelled(forward_label, LMPolicy.forward))
    monkeypatch.setattr(Dist, "backward", labelled(lambda *a, **k: "backward", Dist.backward))
    monkeypatch.setattr(lm, "LMPolicy", Hooked)

    def run(tmp_path, recipe, *settings):
        code = main(["train", recipe, "--no-progress", "--run-dir", str(tmp_path / "run"), *_sets(*settings)])
        assert code == 0
        return calls, [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return run


@pytest.mark.parametrize("disable_dropout,checkpointing", [(True, False), (True, True), (False, True)])
def test_train_mode_each_phase_runs_in_its_mode(recorder, tiny_model, tmp_path, disable_dropout, checkpointing):
    """PPO (value head, reference pass for the KL, old log-probs for 2 epochs) on the tiny model."""
    calls, _ = recorder(tmp_path, "recipes/ppo_arith.yaml", f"model={tiny_model}", *TINY, "steps=1",
                        "lora_dropout=0.5", f"disable_dropout={str(disable_dropout).lower()}",
                        f"gradient_checkpointing={str(checkpointing).lower()}")
    for phase in ("sample", "reference", "old", "update"):
        # the reference runs with the adapter off; sampling with it folded into the weights
        # (fast_lora.merged: no LoRA module, and so no LoRA dropout, runs)
        kinds = ({"layer", "attn", "mlp", "lm"} | ({"lora_dropout"} if phase in ("old", "update") else set())
                 | ({"value_head"} if phase in ("old", "update") else set()))
        assert kinds <= set(calls[phase]), (phase, set(calls[phase]))
    for phase in ("sample", "reference", "old"):  # read-only passes: eval mode everywhere
        assert {k: set(v) for k, v in calls[phase].items()} == {k: {False} for k in calls[phase]}, phase
    update = {k: set(v) for k, v in calls["update"].items()}
    if disable_dropout:
        # eval mode, but for the checkpointed layers' own flag (HF checkpoints a layer only in train mode)
        expected = {k: {checkpointing and k == "layer"} for k in update}
    else:
        expected = {k: {True} for k in update}
    assert update == expected


@pytest.mark.parametrize("checkpointing", [True, False])
def test_train_mode_gradient_checkpointing_recomputes(recorder, tiny_model, tmp_path, checkpointing):
    """With checkpointing on, each checkpointed layer's submodules run again inside backward
    (HF wraps the layer's forward, so the layer's own hooks fire once; its children's fire on
    the recompute too): once per update forward. Off, backward runs no module forward."""
    calls, _ = recorder(tmp_path, "recipes/grpo_arith.yaml", f"model={tiny_model}", *TINY, "steps=1",
                        "epochs=2", f"gradient_checkpointing={str(checkpointing).lower()}")
    forwards = len(calls["update"]["mlp"])
    assert forwards > 0
    assert len(calls["backward"]["mlp"]) == (forwards if checkpointing else 0)
    assert len(calls["backward"]["layer"]) == 0
    if checkpointing:  # the recompute runs in eval mode too: no dropout there either
        assert set(calls["backward"]["mlp"]) == set(calls["backward"]["attn"]) == {False}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_mode_ratio_is_one_at_first_minibatch_with_lora_dropout(recorder, tiny_model, tmp_path, checkpointing):
    """lora_dropout 0.5, 2 epochs of 1 minibatch: the first minibatch is the whole rollout in
    the rollout pass's order, so the update's forward repeats the old-log-prob pass's arithmetic
    on the same weights: its log-probs must equal old_logp exactly (ratio 1). lr is large so
    LoRA B leaves 0 after step 1 (at B = 0 LoRA dropout changes nothing); with
    ``disable_dropout: false`` the same stat must then see the dropout."""
    common = [f"model={tiny_model}", *TINY, "steps=3", "epochs=2", "minibatches=1", "lr=0.05", "lora_dropout=0.5",
              f"gradient_checkpointing={str(checkpointing).lower()}"]
    _, rows = recorder(tmp_path, "recipes/grpo_arith.yaml", *common)
    assert [r["logp_gap_old_trainer"] for r in rows] == [0.0, 0.0, 0.0]
    _, rows = recorder(tmp_path / "dropout", "recipes/grpo_arith.yaml", *common, "disable_dropout=false")
    assert rows[0]["logp_gap_old_trainer"] == 0.0  # B = 0: dropout before it has no effect
    assert all(r["logp_gap_old_trainer"] > 0 for r in rows[1:]), [r["logp_gap_old_trainer"] for r in rows]


def _dropout_policy(tiny_model, disable_dropout):
    torch.manual_seed(0)
    policy = LMPolicy(tiny_model, lora_r=4, lora_alpha=8, lora_dropout=0.5, disable_dropout=disable_dropout)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"], arith_row(56, 7)["prompt"]])
    return policy, policy.generate(ids, attn, group_size=2, max_new_tokens=5)


def _grads(policy, roll):
    params = policy.trainable_parameters()
    return torch.cat([g.flatten() for g in torch.autograd.grad(policy.logp(roll).sum(), params)])


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_train_mode_disable_dropout_gradient(tiny_model, disable_dropout):
    """disable_dropout: the update's gradient is the gradient of the policy that sampled (the
    eval-mode one), exactly, every time. Off: each gradient is one random sub-network's, which
    differs from that one and from the next draw."""
    policy, roll = _dropout_policy(tiny_model, disable_dropout)
    policy.eval_mode()
    g_eval = _grads(policy, roll)
    policy.update_mode()
    g1, g2 = _grads(policy, roll), _grads(policy, roll)
    if disable_dropout:
        assert torch.equal(g1, g_eval) and torch.equal(g2, g_eval)
    else:
        # a dropped half of the LoRA inputs changes the gradient at O(1) relative size, far
        # above float32 rounding (~1e-6 relative)
        assert (g1 - g_eval).norm() > 1e-2 * g_eval.norm()
        assert (g1 - g2).norm() > 1e-2 * g_eval.norm()


def test_first_minibatch_stats_are_reported_unaveraged(tiny_model, tmp_path):
    """entropy and the log-prob gaps are measured once, at the first minibatch (before any step):
    the logged value is that measurement, not it divided by epochs x minibatches. Same seed,
    same rollout; 1 and 3 epochs of one minibatch run the same first forward on the same
    weights in the same order, so they log the same numbers exactly."""
    rows = {}
    for epochs in (1, 3):
        run = tmp_path / str(epochs)
        assert main(["train", "recipes/grpo_arith.yaml", "--no-progress", "--run-dir", str(run),
                     *_sets(f"model={tiny_model}", *TINY, "steps=1", f"epochs={epochs}", "minibatches=1")]) == 0
        rows[epochs] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert rows[1]["entropy"] > 0
    for key in ("entropy", "logp_gap_rollout_trainer"):
        assert rows[3][key] == rows[1][key], key
    assert rows[3]["logp_gap_old_trainer"] == 0.0
