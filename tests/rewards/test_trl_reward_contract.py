"""The reward contract of TRL's GRPOTrainer, met: reward functions with the signatures of TRL's
documented examples score through our reward path (``rlhf.rewards.score``) on the documentation's inputs and on
completions our sampler drew; what every function is given (completion_ids, trainer_state,
dataset columns; only what a closed signature names); async functions awaited concurrently and
stopped by reward_timeout_s; callables wherever a reward is named."""
import asyncio
import re

import pytest
import torch

from rlhf.errors import UserError
from rlhf.rewards import TrainerState, load_rewards, recipe_rewards, score

# ------------------------------------------------------------------------------------------
# Reward functions shaped like the examples in TRL's GRPO Trainer docs ("Using a custom reward
# function", https://huggingface.co/docs/trl/grpo_trainer, and its quick start's length reward):
# the same signatures (which keywords each takes, **kwargs or not, the docs' ``completions_ids``
# spelling, conversational completions, a dataset column, async) and the same documented
# behaviour, written here in our own words rather than copied, so the contract is what is tested.
# ------------------------------------------------------------------------------------------


def trl_quickstart_reward_len():
    def reward_len(completions, **kwargs):  # best at 20 characters, one point off per character
        return [-abs(len(text) - 20) for text in completions]
    return reward_len


def trl_example_1():
    def reward_func(completions_ids, **kwargs):  # longer in tokens scores higher
        return [float(len(token_ids)) for token_ids in completions_ids]
    return reward_func


def trl_example_1_1():
    def reward_func(completions, **kwargs):  # longer in characters scores higher
        return [float(len(text)) for text in completions]
    return reward_func


def trl_example_2():
    import re

    def format_reward_func(completions, **kwargs):  # conversational: 1 for <think>..</think><answer>..</answer>
        shape = re.compile(r"^<think>.*?</think><answer>.*?</answer>$")
        return [float(shape.match(messages[0]["content"]) is not None) for messages in completions]
    return format_reward_func


def trl_example_3():
    import re

    def reward_func(completions, ground_truth, **kwargs):  # a dataset column: the \boxed{} content must equal it
        boxed = [re.search(r"\\boxed\{(.*?)\}", text) for text in completions]
        return [float((m.group(1) if m else "") == truth) for m, truth in zip(boxed, ground_truth)]
    return reward_func


def trl_example_5():
    import asyncio

    async def async_reward_func(prompts, completions, **kwargs):  # stands in for an I/O-bound scorer
        await asyncio.sleep(0.01)
        return [float(bool(text)) for text in completions]
    return async_reward_func



def total(fn, prompts, completions, columns=None, completion_ids=None):
    return score(load_rewards([fn]), prompts, completions, columns or {}, completion_ids)[0].tolist()


def test_trl_documented_examples_give_their_documented_values():
    """The docs' own inputs and outputs, through our score(): completion_ids reaches a function that
    names it completions_ids (the docs' spelling), a dataset column (ground_truth) is passed by
    name, the conversational format reaches completion[0]["content"], async is awaited."""
    prompts, completions = ["The sky is", "The sun is"], [" blue.", " in the sky."]
    ids = [[6303, 13], [304, 279, 12884, 13]]
    assert total(trl_example_1(), prompts, completions, completion_ids=ids) == [2.0, 4.0]
    assert total(trl_example_1_1(), prompts, completions, completion_ids=ids) == [6.0, 12.0]
    assert total(trl_quickstart_reward_len(), prompts, completions) == [-14.0, -8.0]  # 20 - 6, 20 - 12
    chat_prompts = [[{"role": "assistant", "content": "What is the result of (1 + 2) * 4?"}],
                    [{"role": "assistant", "content": "What is the result of (3 + 1) * 2?"}]]
    chat_completions = [
        [{"role": "assistant", "content": "<think>The sum of 1 and 2 is 3, which we multiply by 4 to get 12."
                                          "</think><answer>(1 + 2) * 4 = 12</answer>"}],
        [{"role": "assistant", "content": "The sum of 3 and 1 is 4, which we multiply by 2 to get 8. "
                                          "So (3 + 1) * 2 = 8."}]]
    assert total(trl_example_2(), chat_prompts, chat_completions) == [1.0, 0.0]
    assert total(trl_example_3(), ["Problem: Solve the equation $2x + 3 = 7$. Solution:",
                                   "Problem: Solve the equation $3x - 5 = 10$."],
                 [r" The solution is \boxed{2}.", r" The solution is \boxed{6}."],
                 {"ground_truth": ["2", "5"]}) == [1.0, 0.0]
    assert total(trl_example_5(), prompts, ["x", ""]) == [1.0, 0.0]


def test_trl_own_reward_functions_by_name_and_as_callables():
    """TRL's shipped rewards (imported, not copied): by module:function in a recipe, and as the
    callable object get_soft_overlong_punishment returns (it reads completion_ids)."""
    from trl.rewards import get_soft_overlong_punishment

    completions = [[{"content": "<think>\nThis is my reasoning.\n</think>\nThis is my answer."}],
                   [{"content": "<think>\nThis is my reasoning.\nThis is my answer."}]]
    assert total("trl.rewards:think_format_reward", [[{"role": "user", "content": "q"}]] * 2, completions) == [1.0, 0.0]
    punish = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    ids = [[1] * 90, [1] * 70, [1] * 101]  # (80 - 90) / 20, inside the free zone, past the maximum
    assert total(punish, ["p"] * 3, ["a", "b", "c"], completion_ids=ids) == [-0.5, 0.0, -1.0]


@pytest.fixture(scope="module")
def sampled(tiny_model):
    """Completions drawn by our sampler (the rollout the trainer uses) from the tiny model, for
    text prompts with a ground_truth column and for the same prompts as chats."""
    from rlhf.config import LMConfig
    from rlhf.lm.policy import LMPolicy
    from rlhf.lm.rollout import collect
    from rlhf.lm.rollout_record import completion_id_lists

    torch.manual_seed(0)
    cfg = LMConfig(model=tiny_model, group_size=3, max_new_tokens=12)
    policy = LMPolicy(tiny_model)
    rows = [{"prompt": "What is 12 + 30?", "ground_truth": ""}, {"prompt": "What is 20 + 61?", "ground_truth": "81"}]
    out = {}
    for kind, fmt in (("text", lambda p: p), ("chat", lambda p: [{"role": "user", "content": p}])):
        roll, prompts, completions, columns = collect(policy, [{**r, "prompt": fmt(r["prompt"])} for r in rows], cfg)
        out[kind] = roll, prompts, completions, columns, completion_id_lists(roll)
    return out


def test_trl_examples_on_sampled_completions(sampled):
    """On real completions: completion_ids are the sampled tokens up to and with the end token
    (the rollout's mask), lengths and the column line up per sample, and the conversational
    example reads the chat completions."""
    roll, prompts, completions, columns, ids = sampled["text"]
    assert len(prompts) == len(completions) == 6 and columns["ground_truth"] == ["", "", "", "81", "81", "81"]
    assert [len(i) for i in ids] == roll.mask.sum(1).long().tolist()
    assert all(i[:m] == row[:m].tolist() for i, row, m in zip(ids, roll.completion_ids, roll.mask.sum(1).long()))
    assert total(trl_example_1(), prompts, completions, columns, ids) == [float(len(i)) for i in ids]
    assert total(trl_example_1_1(), prompts, completions, columns, ids) == [float(len(c)) for c in completions]
    assert total(trl_quickstart_reward_len(), prompts, completions, columns, ids) == \
        [float(-abs(20 - len(c))) for c in completions]
    assert not any("\\boxed{" in c for c in completions)  # (a 2-layer random model writes none)
    # no \boxed{}: the extracted content is "", which equals the ground truth "" of the first prompt only
    assert total(trl_example_3(), prompts, completions, columns, ids) == [1.0] * 3 + [0.0] * 3
    roll, prompts, completions, columns, ids = sampled["chat"]
    assert all(c[0]["role"] == "assistant" for c in completions)
    assert not any(c[0]["content"].startswith("<think>") for c in completions)
    assert total(trl_example_2(), prompts, completions, columns, ids) == [0.0] * 6


# ------------------------------------------------------------------------------------ the contract itself
def test_a_closed_signature_gets_only_what_it_names_and_kwargs_get_everything():
    seen = {}

    def closed(completions, ground_truth):  # TRL would pass it prompts, completion_ids, ... : TypeError
        return [float(c == g) for c, g in zip(completions, ground_truth)]

    def open_(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    fns = load_rewards([closed, open_])
    state = TrainerState(global_step=3, max_steps=10)
    out, means, _ = score(fns, ["p", "q"], ["a", "b"], {"ground_truth": ["a", "x"], "extra": [1, 2]},
                          [[5, 2], [7]], state)
    assert out.tolist() == [1.0, 0.0] and means["closed"] == 0.5
    assert set(seen) == {"prompts", "completions", "completion_ids", "trainer_state", "ground_truth", "extra"}
    assert seen["trainer_state"].global_step == 3 and seen["trainer_state"].max_steps == 10
    assert seen["completion_ids"] == [[5, 2], [7]]


def test_async_functions_run_concurrently():
    """Two async functions that each wait for the other to start: they finish only if awaited
    at the same time (one after the other would wait forever; the 30 s bound turns that into a
    failure instead of a hang)."""
    started = {}

    def make(me, other):
        async def fn(completions, **kw):
            started.setdefault(me, asyncio.Event()).set()
            started.setdefault(other, asyncio.Event())
            await asyncio.wait_for(started[other].wait(), 30)
            return [1.0 if me == "a" else 2.0] * len(completions)
        fn.__name__ = me
        return fn

    out, means, _ = score(load_rewards([make("a", "b"), make("b", "a")]), ["p"], ["c"], {})
    assert out.tolist() == [3.0] and means["a"] == 1.0 and means["b"] == 2.0


def test_a_sync_function_returning_a_coroutine_and_a_notebook_loop():
    """A lambda around an async call is awaited; score() called where an event loop already runs
    (as in a notebook cell) still works: the rewards' loop is its own thread."""
    async def judge(text):
        await asyncio.sleep(0)
        return float(len(text))

    async def gathered(completions):
        return list(await asyncio.gather(*map(judge, completions)))

    fns = load_rewards([lambda completions, **kw: gathered(completions)])

    async def cell():
        return score(fns, ["p", "p"], ["ab", "abc"], {})[0].tolist()

    assert asyncio.run(cell()) == [2.0, 3.0]


def test_an_async_sample_past_the_timeout_scores_none_and_is_named(capsys):
    async def slow(completions, **kw):
        await asyncio.sleep(60 if completions[0] == "hang" else 0)
        return [float(len(completions[0]))]

    fns = load_rewards([slow, {"rewards.arith:arith_correct": 1.0}], timeout_s=0.5)
    assert fns[0].pool is None and fns[1].pool is not None  # async stays on the loop, sync goes to workers
    try:
        out, means, scored = score(fns, ["p"] * 3, ["68", "hang", "abc"], {"answer": ["68"] * 3})
    finally:
        fns[1].pool.close()
    assert out.tolist() == [3.0, 0.0, 3.0] and scored.tolist() == [True, True, True]
    assert means["slow/timeouts"] == pytest.approx(1 / 3) and means["slow"] == 2.5
    assert "reward function 'slow' ran past reward_timeout_s=0.5 on sample 1 (completion 'hang')" in \
        capsys.readouterr().err


def test_an_async_function_that_never_awaits_is_named_and_the_next_batch_gets_a_fresh_loop(monkeypatch):
    """wait_for cannot cancel a call that blocks the loop (time.sleep in an async def): past twice
    the timeout plus LOOP_GRACE_S the batch stops with one sentence, and the next batch runs on a
    fresh loop."""
    import time

    import rlhf.rewards as rewards_module

    monkeypatch.setattr(rewards_module, "LOOP_GRACE_S", 0.5)

    async def blocking(completions, **kw):
        time.sleep(3)  # not awaited: the loop is stuck for 3 s
        return [1.0]

    async def fine(completions, **kw):
        return [2.0]

    with pytest.raises(UserError, match=r"blocked the event loop past 0.7 s"):
        score(load_rewards([blocking], timeout_s=0.1), ["p"], ["c"], {})
    assert score(load_rewards([fine], timeout_s=0.1), ["p"], ["c"], {})[0].tolist() == [2.0]


def test_a_raising_async_function_names_itself_and_the_sample():
    async def bad(completions, **kw):
        return [1 / len(c) for c in completions]

    with pytest.raises(UserError, match=r"'bad' raised ZeroDivisionError.*on sample 1 \(completion ''\)"):
        score(load_rewards([bad]), ["p"] * 2, ["a", ""], {})


def test_callables_in_specs_weights_names_and_workers():
    from rewards import arith_correct

    fns = load_rewards([{arith_correct: 0.5}, lambda completions, **kw: [1.0] * len(completions),
                        lambda completions, **kw: [2.0] * len(completions)])
    assert [(rf.name, rf.weight, rf.ref) for rf in fns] == [
        ("arith_correct", 0.5, "rewards.arith:arith_correct"), ("<lambda>", 1.0, None), ("<lambda>_2", 1.0, None)]
    out, means, _ = score(fns, ["p"], ["68"], {"answer": ["68"]})
    assert out.tolist() == [3.5] and means["<lambda>_2"] == 2.0
    assert recipe_rewards([{arith_correct: 0.5}, "arith_format", lambda c: c]) == [
        {"rewards.arith:arith_correct": 0.5}, "arith_format", "callable:<lambda>"]
    pooled = load_rewards([arith_correct], workers=1)  # an importable function: workers load it by name
    try:
        assert score(pooled, ["p"], ["68"], {"answer": ["68"]})[0].tolist() == [1.0]
    finally:
        pooled[0].pool.close()
    with pytest.raises(UserError, match="'<lambda>' is a function worker processes cannot import"):
        load_rewards([lambda completions, **kw: [0.0]], timeout_s=1.0)
    with pytest.raises(UserError, match="was a Python function given to rlhf.train"):
        load_rewards(["callable:<lambda>"])
