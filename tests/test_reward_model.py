"""Learned rewards: the Bradley-Terry loss by hand, a reward-model run on a tiny model, and a
GRPO run rewarded by that model."""
import json
import math

import torch

from rlhf.cli import main
from rlhf.reward_model import arith_pairs, bradley_terry_loss


def test_bradley_terry_by_hand():
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # -(log sigmoid(1) + log sigmoid(-1)) / 2
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == 0.0


def test_arith_pairs_prefer_the_right_sum_and_hold_out_problems():
    pairs = arith_pairs(50, seed=0)
    for p in pairs:
        assert str(p["a"] + p["b"]) in p["chosen"] and p["chosen"] != p["rejected"]
    seen = {(p["a"], p["b"]) for p in pairs}
    assert not seen & {(p["a"], p["b"]) for p in arith_pairs(50, seed=1, exclude=seen)}


def test_reward_model_recipe_and_its_use_as_a_reward(tiny_model, tmp_path, capsys):
    rm_run = tmp_path / "rm"
    code = main(["train", "recipes/rm_arith.yaml", "--no-progress", "--run-dir", str(rm_run),
                 "--set", f"model={tiny_model}", "--set", "steps=3", "--set", "prompts_per_step=4",
                 "--set", "eval_problems=8", "--set", "lora_r=2", "--set", "lora_alpha=4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heldout_pairs"] == 8 and 0 <= result["heldout_pairwise_accuracy"] <= 1
    assert (rm_run / "reward_model" / "adapter_config.json").is_file()
    code = main(["eval", str(rm_run), "--no-progress", "--problems", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["heldout_pairs"] == 4

    code = main(["train", "recipes/grpo_arith.yaml", "--no-progress", "--run-dir", str(tmp_path / "g"),
                 "--set", f"model={tiny_model}", "--set", "steps=1", "--set", "prompts_per_step=2",
                 "--set", "group_size=2", "--set", "max_new_tokens=3", "--set", "lora_r=2",
                 "--set", f"rewards=[rm:{rm_run}/reward_model]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads((tmp_path / "g" / "metrics.jsonl").read_text().splitlines()[0])
    assert f"rewards/rm:{rm_run}/reward_model" in row and math.isfinite(row["reward"])


def test_missing_reward_model_is_one_sentence(tmp_path, capsys):
    code = main(["train", "recipes/grpo_arith.yaml", "--set", f"rewards=[rm:{tmp_path}/none]",
                 "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "reward model" in capsys.readouterr().err
