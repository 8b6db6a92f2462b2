"""Agent recipes through the real LM trainer on the tiny model: a text environment written by
someone else (``path/to/file.py:Class`` over a shipped recipe's ``env``) trains and its
completions.jsonl holds whole episodes with their rewards; the loss's gradient is exactly zero
on the environment's ids and not on the policy's; the sampler/trainer log-prob gap over
multi-turn episodes stays within today's bound; a template breaking the prefix property stops
the run in one sentence; a stopped run resumes exactly; ``rlhf eval`` reports success and
return, base against trained; a short choose run on that environment raises its return."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf import checkpoint
from rlhf.cli import main
from rlhf.lm.policy import LMPolicy

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# someone else's text environment: three turns, the reward favours short replies that say "yes"
WORDS_ENV = '''
class Words:
    instructions = "Answer each question with yes or no."

    def __init__(self, turns=3):
        self.turns = turns

    def reset(self, seed=None, options=None):
        self.t, self.seed = 0, seed
        return f"Question 1 of seed {seed}: is the sky blue?", {"valid_actions": ["yes", "no", "maybe"]}

    def step(self, action):
        self.t += 1
        reward = (1.0 if "yes" in action else 0.0) + 1.0 / (1 + len(action))
        done = self.t >= self.turns
        return f"Question {self.t + 1}: is grass green?", reward, done, False, {"valid_actions": ["yes", "no", "maybe"]}
'''

TINY = ["steps=2", "prompts_per_step=2", "group_size=3", "max_turns=3", "max_new_tokens=4", "lora_r=2",
        "lora_alpha=4", "eval_problems=3", "threads=1"]


def sets(items):
    return [a for x in items for a in ("--set", x)]


@pytest.fixture()
def words_env(tmp_path):
    path = tmp_path / "someone_elses_env.py"
    path.write_text(WORDS_ENV)
    return f"{path}:Words"


def train(recipe, run_dir, model, extra=()):
    args = ["train", str(RECIPES / recipe), "--no-progress", "--run-dir", str(run_dir),
            *sets([f"model={model}", *TINY, *extra])]
    return main(args)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["grpo_frozenlake.yaml", "ppo_frozenlake_choose.yaml", "grpo_frozenlake_choose.yaml",
                                    "grpo_blackjack_choose.yaml"])
def test_someone_elses_env_trains_and_logs_whole_episodes(recipe, words_env, tiny_model, tmp_path, capsys):
    run = tmp_path / "run"
    # (grpo in choose mode: the tiny model's summed scores put 99.6% on one action, every group would
    # be equal and nothing would train; per-token scores spread it)
    extra = ["choose_score=mean"] if recipe.startswith("grpo_") and "choose" in recipe else []
    assert train(recipe, run, tiny_model, [f"env={words_env}", "env_kwargs={}", *extra]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adapter_norm"] > 0
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["logp_gap_rollout_trainer"] < 1e-4 for r in rows), [r["logp_gap_rollout_trainer"] for r in rows]
    # environment steps: every episode's turns (3 questions each; 2 tasks x 3 episodes)
    assert all(r["episode/turns"] == 3 and r["env_steps"] == 3 * 2 * 3 for r in rows), rows
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    first = samples[0]
    assert first["prompt"].startswith("user: Answer each question with yes or no.\n\nQuestion 1 of seed")
    turns = first["completion"].split("\nuser: ")  # reply, then the observation it led to, three times
    assert turns[0].startswith("assistant: ") and len(turns) == 4
    assert all(t.startswith(f"Question {k + 2}: is grass green?\nassistant: ") for k, t in enumerate(turns[1:3]))
    assert first["rewards"]["env_return"] == first["reward"] != 0
    assert "Question 1 of seed" in (run / "report.html").read_text()
    assert main(["eval", str(run), "--no-progress"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["episodes"] == 3 and {"base_success", "trained_success", "base_return", "trained_return",
                                    "trained_return_se", "base_sampled_success", "trained_sampled_success",
                                    "trained_sampled_success_se"} <= set(ev)


@pytest.mark.parametrize("recipe", ["grpo_frozenlake.yaml", "ppo_frozenlake_choose.yaml"])
def test_the_gradient_is_zero_on_environment_ids_and_not_on_the_policys(recipe, words_env, tiny_model, tmp_path,
                                                                        monkeypatch):
    """The gradient of the real update's loss with respect to each id's log-prob: exactly 0 on every
    id the environment wrote, non-zero on the policy's ids of rows with an advantage."""
    seen = []
    forward = LMPolicy.forward

    def spy(self, batch, adapter=True, values=False, entropy=False):
        out = forward(self, batch, adapter, values, entropy)
        if torch.is_grad_enabled() and out["logp"].requires_grad:
            out["logp"].register_hook(lambda g, b=batch: seen.append((g.detach().clone(), b)))
        return out

    monkeypatch.setattr(LMPolicy, "forward", spy)
    if "choose" in recipe:
        from rlhf.agents.choose import ChoicePolicy
        monkeypatch.setattr(ChoicePolicy, "forward", spy.__get__ if False else _choice_spy(seen))
    assert train(recipe, tmp_path / "run", tiny_model, [f"env={words_env}", "steps=1", "kl_coef=0.1"]) == 0
    assert seen
    for grad, roll in seen:
        env_ids = (roll.attention > 0) & (roll.mask == 0)
        assert env_ids.any() and (grad[env_ids] == 0).all()
        assert (grad[roll.mask > 0] != 0).any()


def _choice_spy(seen):
    from rlhf.agents.choose import ChoicePolicy, choice_forward

    def spy(self, batch, adapter=True, values=False, entropy=False):
        out = choice_forward(self.net, batch, adapter, values, entropy)
        if torch.is_grad_enabled() and out["logp"].requires_grad:
            out["logp"].register_hook(lambda g, b=batch: seen.append((g.detach().clone(), b)))
        return out
    return spy


def test_a_template_breaking_the_prefix_property_stops_the_run_in_one_sentence(words_env, tiny_model, tmp_path,
                                                                                capsys):
    model = tmp_path / "thinking"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' "
                               "and not loop.last %}<think></think>{% else %}{{ m['content'] }}{% endif %}<|im_end|>"
                               "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in (model / "chat_template.jinja",):
        extra.unlink(missing_ok=True)
    assert train("ppo_frozenlake_choose.yaml", tmp_path / "run", model, [f"env={words_env}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the chat template breaks the prefix property a multi-turn episode needs" in err


class Stop(BaseException):
    """Ends the first run just after a checkpoint."""


@pytest.mark.parametrize("recipe", ["grpo_frozenlake.yaml", "ppo_frozenlake_choose.yaml"])
def test_a_stopped_agent_run_resumes_exactly(recipe, words_env, tiny_model, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = [f"env={words_env}", "steps=4", "save_every=2", "seed=3"]
    assert train(recipe, full, tiny_model, extra) == 0
    real = checkpoint.publish

    def publish(*args, **kwargs):
        real(*args, **kwargs)
        raise Stop
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "publish", publish)
        with pytest.raises(Stop):
            train(recipe, cut, tiny_model, extra)
    assert metrics(cut)[-1]["step"] == 2
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k} for r in rows]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(full))
    weights = lambda run: (run / "adapter" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert weights(cut) == weights(full)


def test_a_short_choose_run_raises_the_return(words_env, tiny_model, tmp_path, capsys):
    """Learning tier, on the tiny model in seconds: GRPO in choose mode (actions scored per token,
    so the tiny model starts near uniform over yes / no / maybe) learns that "yes" pays."""
    extra = [f"env={words_env}", "action_mode=choose", "choose_score=mean", "steps=30", "group_size=4",
             "lora_r=4", "lora_alpha=8", "lr=0.01", "seed=0"]
    assert train("grpo_frozenlake.yaml", tmp_path / "run", tiny_model, extra) == 0
    rewards = [r["reward"] for r in metrics(tmp_path / "run")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert last > first + 0.3, rewards
