"""Datasets as tasks: files, save_to_disk directories, dataset repositories (local directory
or Hub id, through one load_dataset call), column mapping, templates, chat options, and
left-truncated prompts."""
import json
import random

import datasets
import pytest
import torch

from rlhf.config import load_recipe
from rlhf.errors import UserError
from rlhf.lm.policy import LMPolicy
from rlhf.tasks import FileTask, RowFormat, load_dataset_source, split_held_out, task_from_config

README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train.jsonl
---
# a GSM8K-shaped dataset repository
"""


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _gsm_rows(n, tag):
    return [{"question": f"{tag} question {i}?", "answer": f"steps\n#### {i}"} for i in range(n)]


@pytest.fixture
def repo(tmp_path):
    """A local dataset repository laid out like openai/gsm8k on the Hub."""
    root = tmp_path / "gsm8k_repo"
    _write_jsonl(root / "main" / "train.jsonl", _gsm_rows(20, "main-train"))
    _write_jsonl(root / "main" / "test.jsonl", _gsm_rows(5, "main-test"))
    _write_jsonl(root / "socratic" / "train.jsonl", _gsm_rows(8, "socratic-train"))
    (root / "README.md").write_text(README)
    return root


def _cfg(**values):
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def test_plain_jsonl_with_a_prompt_column_keeps_its_rows_and_split(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(30)]
    path = tmp_path / "t.jsonl"
    _write_jsonl(path, rows)
    task = FileTask(str(path), seed=3)
    assert isinstance(task._data, datasets.Dataset)  # kept as Arrow, rows made one at a time
    train, held = split_held_out(rows, random.Random(3))
    assert task.held_out(100, 0) == held  # same rows as before: text prompts stay text
    seen = [next(r) for r in [task.train_rows()] for _ in range(len(train))]
    assert sorted(r["prompt"] for r in seen) == sorted(r["prompt"] for r in train)


def test_dataset_repository_config_split_and_column_mapping(repo):
    cfg = _cfg(task=str(repo), task_config="main", eval_split="test", columns={"prompt": "question"})
    task = task_from_config(cfg)
    assert len(task._data) == 20 and isinstance(task._data, datasets.Dataset)
    held = task.held_out(10, 0)
    assert [r["prompt"] for r in held] == [f"main-test question {i}?" for i in range(5)]
    assert held[0]["answer"] == "steps\n#### 0" and held[0]["question"] == held[0]["prompt"]
    other = task_from_config(_cfg(task=str(repo), task_config="socratic", columns={"prompt": "question"}))
    assert len(other._train_idx) + len(other._eval_idx) == 8  # 10% held out of that config's train


def test_hub_id_goes_through_the_same_load_dataset_call(repo, monkeypatch):
    """A Hub id and a local repository directory reach the same ``load_dataset(source,
    name=config, split=split)``; here the Hub id is answered by the local repository."""
    calls, real = [], datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return real(str(repo) if path == "openai/gsm8k" else path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    local = load_dataset_source(str(repo), "main", "test")
    hub = load_dataset_source("openai/gsm8k", "main", "test")
    assert calls == [(str(repo), (), {"name": "main", "split": "test"}),
                     ("openai/gsm8k", (), {"name": "main", "split": "test"})]
    assert hub.to_list() == local.to_list()


def test_save_to_disk_directories(tmp_path):
    ds = datasets.Dataset.from_list([{"text": f"q{i}", "label": i} for i in range(10)])
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "two"))
    assert load_dataset_source(str(tmp_path / "one"))["text"] == ds["text"]
    assert len(load_dataset_source(str(tmp_path / "two"), split="test")) == 3
    with pytest.raises(UserError, match="no split 'dev'.*train, test"):
        load_dataset_source(str(tmp_path / "two"), split="dev")
    task = FileTask(str(tmp_path / "two"), 0, eval_split="test",
                    fmt=RowFormat(prompt_template="Q: {text} (label {label})"))
    assert task.held_out(1, 0)[0]["prompt"] == "Q: q0 (label 0)"


def test_template_system_prompt_and_chat():
    raw = {"question": "2+2?", "answer": "4"}
    assert RowFormat({"prompt": "question"})(raw)["prompt"] == "2+2?"
    assert RowFormat({"prompt": "question"}, chat=True)(raw)["prompt"] == [{"role": "user", "content": "2+2?"}]
    row = RowFormat(prompt_template="Solve: {question}", system_prompt="Be brief.")(raw)
    assert row["prompt"] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Solve: 2+2?"}]
    chat = {"prompt": [{"role": "user", "content": "hi"}]}
    assert RowFormat(system_prompt="S")(chat)["prompt"][0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize("kwargs, raw_cols, match", [
    ({"columns": {"prompt": "query"}}, ["question"], "columns maps {'prompt': 'query'}.*question"),
    ({}, ["question"], "no 'prompt' column.*columns: {prompt: <column>}"),
    ({"prompt_template": "{query}"}, ["question"], "prompt_template '{query}' names 'query'"),
])
def test_bad_data_keys_are_one_sentence(tmp_path, kwargs, raw_cols, match):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{c: "x" for c in raw_cols}] * 3)
    with pytest.raises(UserError, match=match):
        FileTask(str(path), 0, fmt=RowFormat(**kwargs))


def test_bad_sources_are_one_sentence(tmp_path, repo):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"prompt": "x"}] * 3)
    with pytest.raises(UserError, match="single file.*'test'"):
        load_dataset_source(str(path), split="test")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="task_config='nope'.*local directory"):
        load_dataset_source(str(repo), "nope")
    with pytest.raises(UserError, match="no-such-org/no-such-data.*Hub dataset id"):
        load_dataset_source("no-such-org/no-such-data")


def test_chat_template_kwargs_and_max_prompt_length(tiny_model):
    torch.manual_seed(0)
    policy = LMPolicy(tiny_model, lora_r=2, lora_alpha=4)
    policy.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}<|im_start|>")
    msgs = [{"role": "user", "content": "What is 12 + 34?"}]
    assert "/no_think" not in policy.apply_template(msgs)
    policy.set_options(chat_template_kwargs={"enable_thinking": False})
    assert policy.apply_template(msgs).endswith("/no_think<|im_start|>")
    prompts = ["What is 12 + 34? Answer with just the number.", "12 + 34"]
    full = [policy.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    n = len(full[1]) + 1  # the long prompt is cut to its last n tokens, the short one is not
    assert len(full[0]) > n
    policy.set_options(max_prompt_length=n)
    ids, attn = policy.encode_prompts(prompts)
    assert ids[0].tolist() == full[0][-n:] and attn[0].tolist() == [1] * n
    assert ids[1, attn[1].bool()].tolist() == full[1] and attn[1, 0] == 0  # left-padded
    assert (policy.prompts_truncated, policy.prompts_seen) == (1, 2)


@pytest.mark.parametrize("trl_key, ours", [("dataset_name", "task"), ("dataset_config", "task_config"),
                                           ("dataset_train_split", "task_split"),
                                           ("dataset_test_split", "eval_split")])
def test_trl_dataset_keys_point_to_ours(trl_key, ours):
    with pytest.raises(UserError, match=f"unknown recipe key '{trl_key}'; did you mean {ours}"):
        load_recipe(None, [f"{trl_key}=openai/gsm8k"])
