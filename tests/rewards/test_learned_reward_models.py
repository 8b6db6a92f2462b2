"""Learned rewards (the Bradley-Terry loss by hand is in tests/core/test_advantages_and_objectives_by_hand.py): the log-ratio
reward against a by-hand computation, reward-model runs on a tiny model (generated pairs and a preference file), and
GRPO rewarded by such a model (recipes/grpo_rm_arith.yaml)."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from rewards.arith import last_integer
from rlhf.cli import main
from rlhf.lm.forward import length_buckets
from rlhf.lm.reward_model import RewardModel, RewardModelFn
from rlhf.preferences import arith_pairs, sampled_arith_pairs
from rlhf.trainers.reward_model import linear_lr
from rlhf.tasks import FileTask, fresh_problems, split_held_out

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"  # not the working directory


def test_linear_lr_warms_up_then_decays_to_zero():
    assert [linear_lr(s, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [round(linear_lr(s, 2, 6), 4) for s in range(6)] == [0.3333, 0.6667, 1.0, 0.75, 0.5, 0.25]


def test_arith_pairs_prefer_the_right_sum_and_hold_out_problems():
    pairs = arith_pairs(50, seed=0)
    for p in pairs:
        assert str(p["a"] + p["b"]) in p["chosen"] and p["chosen"] != p["rejected"]
    seen = {(p["a"], p["b"]) for p in pairs}
    held_out = [(p["a"], p["b"]) for p in arith_pairs(200, seed=1, exclude=seen)]
    assert not seen & set(held_out) and len(set(held_out)) == 200  # fresh and distinct problems


def test_log_ratio_reward_by_hand(tiny_model):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model, lora_r=2, lora_alpha=4, beta=0.5)
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    long = "12 + 30 = 42, since 2 + 0 = 2 and 1 + 3 = 4, so the answer is 42"
    prompts = [chat, "What is 1 + 2? ", chat, chat]  # the chat prompt runs once, for three completions
    completions = [[{"role": "assistant", "content": c}] for c in ("42", "3", "12 + 30 = 42", long)]
    completions[1] = "3"  # a plain-text prompt; the long completion runs in a length bucket of its own
    with torch.no_grad():
        assert rm.score(prompts, completions).abs().max().item() == 0.0  # LoRA B = 0: no preference yet
        for n, p in rm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        got = rm.score(prompts, completions)

    def logp_sum(prefix: str, suffix: str) -> float:  # one sequence, no padding, full logits
        a = rm.tokenizer(prefix, add_special_tokens=False).input_ids
        b = rm.tokenizer(suffix, add_special_tokens=False).input_ids
        logits = rm.model(input_ids=torch.tensor([a + b])).logits[0].log_softmax(-1)
        return sum(logits[len(a) - 1 + j, t].item() for j, t in enumerate(b))

    prefix = rm.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    cases = [(prefix, "42<|im_end|>\n"), ("What is 1 + 2? ", "3<|im_end|>"),
             (prefix, "12 + 30 = 42<|im_end|>\n"), (prefix, long + "<|im_end|>\n")]
    assert [rm.split(p, c) for p, c in zip(prompts, completions)] == cases
    enc = rm.encode(prompts, completions)
    assert enc["prompt_ids"].shape[0] == 2 and len(length_buckets(enc["mask"])) == 2
    with torch.no_grad():
        for i, (prefix, suffix) in enumerate(cases):
            with_adapter = logp_sum(prefix, suffix)
            with rm.model.disable_adapter():
                base = logp_sum(prefix, suffix)
            assert abs(got[i].item() - 0.5 * (with_adapter - base)) < 1e-4


def test_classifier_reads_the_last_real_token(tiny_model):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model, lora_r=2, lora_alpha=4, head="classifier")
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    prompts = [chat, "What is 1 + 2? ", chat]  # prompts of unequal length, completions too
    completions = ["42", "3", "12 + 30 = 42, since 2 + 0 = 2 and 1 + 3 = 4"]
    with torch.no_grad():
        for n, p in rm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        got = rm.score(prompts, completions)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            prefix, suffix = rm.split(prompt, completion)
            ids = rm.tokenizer(prefix, add_special_tokens=False).input_ids + rm.tokenizer(
                suffix, add_special_tokens=False).input_ids
            hidden = rm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
            assert abs(got[i].item() - (hidden[0, -1] @ rm.score_head.weight[0]).item()) < 1e-4


@pytest.mark.parametrize("head", ["log_ratio", "classifier"])
def test_reward_model_save_load_round_trip(head, tiny_model, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model, lora_r=2, lora_alpha=4, beta=0.3, head=head)
    with torch.no_grad():
        for n, p in rm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompts, completions = ["What is 1 + 2? ", "What is 3 + 4? "], ["3", "8"]
    rm.save(tmp_path / "rm")
    loaded = RewardModelFn(str(tmp_path / "rm"))
    assert loaded.rm.head == head and loaded.rm.beta == 0.3
    assert (tmp_path / "rm" / "score_head.safetensors").is_file() == (head == "classifier")
    with torch.no_grad():
        assert torch.allclose(torch.tensor(loaded(prompts, completions)), rm.score(prompts, completions), atol=1e-5)


def test_sampled_pairs_are_judged_by_arith_correct(tiny_model):
    rm = RewardModel(tiny_model, lora_r=2, lora_alpha=4)
    problems = fresh_problems(12, "t", exclude={(10, 10)})
    assert len(set(problems)) == 12 and (10, 10) not in problems
    rows = sampled_arith_pairs(rm, problems, seed=0, max_new_tokens=6, temperature=1.0, batch=5)
    assert [(r["a"], r["b"]) for r in rows] == problems
    for r in rows:
        s, wrong = r["a"] + r["b"], last_integer(r["rejected"])
        assert last_integer(r["chosen"]) == s and wrong != s
        # a written answer against the sample, or a right sample against a written wrong answer
        assert r["chosen"] in (str(s), f"{r['a']} + {r['b']} = {s}") or r["rejected"] in (
            str(wrong), f"{r['a']} + {r['b']} = {wrong}")
    again = sampled_arith_pairs(rm, problems, seed=0, max_new_tokens=6, temperature=1.0, batch=5)
    assert again == rows  # held-out pairs are rebuilt identically by `rlhf eval`


def test_reward_model_files_share_the_file_task_split(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = split_held_out(rows, random.Random(3))
    assert len(held_out) == 3 and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    file_task = FileTask(str(path), seed=3)
    assert [r["prompt"] for r in file_task.held_out(10, 0)] == [r["prompt"] for r in held_out]


def grpo_rewarded_by(rm_path, tiny_model, run_dir, capsys, steps: int) -> list[dict]:
    """Runs recipes/grpo_rm_arith.yaml on the tiny model with the reward model at ``rm_path``
    (and arith_correct at weight 0); its metrics rows."""
    code = main(["train", str(RECIPE_DIR / "grpo_rm_arith.yaml"), "--no-progress", "--run-dir", str(run_dir),
                 "--set", f"model={tiny_model}", "--set", f"steps={steps}", "--set", "prompts_per_step=2",
                 "--set", "group_size=2", "--set", "max_new_tokens=3", "--set", "lora_r=2",
                 "--set", f"rewards=[rm:{rm_path}, {{arith_correct: 0.0}}]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


TINY_RM = ["--set", "steps=2", "--set", "prompts_per_step=4", "--set", "lora_r=2", "--set", "lora_alpha=4"]


def test_reward_model_recipe_then_grpo_rewarded_by_it(tiny_model, tmp_path, capsys):
    rm_run = tmp_path / "rm"
    code = main(["train", str(RECIPE_DIR / "rm_arith.yaml"), "--no-progress", "--run-dir", str(rm_run),
                 "--set", f"model={tiny_model}", "--set", "eval_problems=8", *TINY_RM])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heldout_pairs"] == 8
    assert result["heldout_pairs_near_miss"] == 6 and result["heldout_pairs_sampled"] == 2  # 25% sampled
    # the accuracy is the pair-weighted mean of the two kinds' (4-decimal rounding: 1e-4)
    parts = 6 * result["heldout_accuracy_near_miss"] + 2 * result["heldout_accuracy_sampled"]
    assert result["heldout_pairwise_accuracy"] == pytest.approx(parts / 8, abs=1e-4)
    assert (rm_run / "reward_model" / "adapter_config.json").is_file()
    rows = [json.loads(x) for x in (rm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows[:2])
    code = main(["eval", str(rm_run), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # the saved reward model, read back, scores the run's 8 held-out pairs as the trained one did
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev == {"run_dir": str(rm_run), **result_heldout(result)}
    code = main(["eval", str(rm_run), "--no-progress", "--problems", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["heldout_pairs"] == 4

    rm_path = f"{rm_run}/reward_model"
    steps = grpo_rewarded_by(rm_path, tiny_model, tmp_path / "g", capsys, steps=2)
    assert len(steps) == 2
    for row in steps:  # the weight-0 arith_correct is logged but adds nothing to the reward
        learned = row[f"rewards/rm:{rm_path}"]
        assert math.isfinite(learned) and abs(row["reward"] - learned) < 1e-5
        assert 0 <= row["rewards/arith_correct"] <= 1


@pytest.mark.parametrize("head", ["log_ratio", "classifier"])
def test_reward_model_on_a_preference_file(head, tiny_model, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1? ", "chosen": str(i + 1),
                                        "rejected": str(i + 2)}) + "\n" for i in range(20)))
    code = main(["train", str(RECIPE_DIR / "rm_arith.yaml"), "--no-progress", "--run-dir", str(tmp_path / "rm"),
                 "--set", f"model={tiny_model}", "--set", f"task={path}", "--set", f"rm_head={head}", *TINY_RM])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heldout_pairs"] == 2  # 10% of the file
    assert json.loads((tmp_path / "rm" / "reward_model" / "reward_model.json").read_text())["head"] == head
    code = main(["eval", str(tmp_path / "rm"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"run_dir": str(tmp_path / "rm"), **result_heldout(result)}
    # the same held-out pairs of the file (the recipe's seed 0 split), scored through the reward
    # function contract (rewards: [rm:DIR]), give the accuracy the run reported
    rm_path = tmp_path / "rm" / "reward_model"
    _, held = split_held_out([json.loads(x) for x in path.read_text().splitlines()], random.Random(0))
    prompts = [r["prompt"] for r in held]
    scores = RewardModelFn(str(rm_path))(prompts + prompts, [r["chosen"] for r in held] + [r["rejected"] for r in held])
    right = sum(c > r for c, r in zip(scores[:len(held)], scores[len(held):]))
    assert result["heldout_pairwise_accuracy"] == right / len(held)
    (step,) = grpo_rewarded_by(rm_path, tiny_model, tmp_path / "g", capsys, steps=1)
    learned = step[f"rewards/rm:{rm_path}"]  # the weight-0 arith_correct adds nothing to the reward
    assert math.isfinite(learned) and abs(step["reward"] - learned) < 1e-5


def result_heldout(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith("heldout")}


@pytest.mark.parametrize("recipe", [str(RECIPE_DIR / "grpo_rm_arith.yaml"), str(RECIPE_DIR / "grpo_arith.yaml")])
def test_missing_reward_model_says_how_to_train_it(recipe, tmp_path, capsys):
    missing = tmp_path / "none" / "reward_model"
    code = main(["train", recipe, "--set", f"rewards=[rm:{missing}]", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "reward model" in err and f"--run-dir {tmp_path / 'none'}" in err


def test_the_grpo_recipe_names_the_documented_reward_model_path():
    import yaml

    rewards = yaml.safe_load((RECIPE_DIR / "grpo_rm_arith.yaml").read_text())["rewards"]
    assert "rm:runs/rm_arith/reward_model" in rewards


def test_a_preference_file_without_its_columns_is_one_clear_error(tiny_model, tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,good,bad\nWhat is 1 + 2?,3,4\n")
    code = main(["train", str(RECIPE_DIR / "rm_arith.yaml"), "--no-progress", "--run-dir", str(tmp_path / "rm"),
                 "--set", f"model={tiny_model}", "--set", f"task={path}", *TINY_RM])
    err = capsys.readouterr().err
    assert code == 2 and "lacks columns ['chosen', 'rejected']; it needs prompt, chosen and rejected" in err
    assert [x for x in err.splitlines() if not x.startswith("run directory:")] == [err.splitlines()[-1]]


def test_an_unknown_reward_head_is_one_clear_error(tmp_path, capsys):
    code = main(["train", str(RECIPE_DIR / "rm_arith.yaml"), "--set", "rm_head=linear", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "rm_head='linear' is not valid; choose one of log_ratio, classifier" in err
