"""Bad input, class by class, through the real CLI: each ends with exit status 2 and one
sentence on stderr naming the key or file, and leaves a run directory that already holds a run
exactly as it was (and creates no new one). Plus the range table's completeness and the
signature reading of reward columns."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import CONFIGS, load_recipe, to_dict
from rlhf.errors import UserError
from rlhf.preflight import check_rows, reward_columns
from rlhf.validation import RANGES, Range

ROOT = Path(__file__).resolve().parents[2]
LM_RECIPE, GYM_RECIPE = str(ROOT / "recipes/grpo_arith.yaml"), str(ROOT / "recipes/ppo_cartpole.yaml")
LM_GOOD = ["steps=2", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "eval_problems=4", "lora_r=2",
           "lora_alpha=4", "threads=1"]
GYM_GOOD = ["total_steps=300", "log_every=100", "eval_episodes=2", "n_steps=16"]


# ------------------------------------------------------------------------------ the range table
def _numeric(hint) -> bool:
    args = typing.get_args(hint) or (hint,)
    return any(a in (int, float) for a in args)


@pytest.mark.parametrize("cls", sorted(set(CONFIGS.values()), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_numeric_key_of_every_family_has_a_range(cls):
    hints = typing.get_type_hints(cls)
    numeric = {f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name])}
    assert numeric == set(RANGES[cls.__name__]), numeric ^ set(RANGES[cls.__name__])
    defaults = cls()
    for key, rng in RANGES[cls.__name__].items():  # every default is valid
        value = getattr(defaults, key)
        assert value is None or rng.holds(value), (key, value, rng)


def test_every_shipped_recipe_is_in_range():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(str(path))


@pytest.mark.parametrize("rng, inside, outside, text", [
    (Range(0, low_open=True), [1e-12, 5.0], [0, -1.0], "> 0"),
    (Range(1), [1, 10**9], [0, -3], ">= 1"),
    (Range(0, 1), [0, 0.5, 1], [-1e-9, 1.0000001], "in [0, 1]"),
    (Range(0, 1, low_open=True, high_open=True), [0.2], [0, 1], "in (0, 1)"),
    (Range(0, 1, high_open=True), [0, 0.99], [1], "in [0, 1)"),
    (Range(1, also=(-1,)), [-1, 1, 7], [0, -2], ">= 1 or -1"),
    (Range(), [-1e30, 0, 1e30], [], "a finite number"),
    (Range(0, 2**32 - 1), [0, 2**32 - 1], [-1, 2**32], "in [0, 4294967295]"),
])
def test_range_bounds_and_wording(rng, inside, outside, text):
    assert all(rng.holds(v) for v in inside) and not any(rng.holds(v) for v in outside)
    assert str(rng) == text


# ---------------------------------------------------------------------- bad inputs, via the CLI
@pytest.fixture(scope="session")
def bad(tiny_model, tmp_path_factory) -> dict:
    """Files and model directories, each broken one way, built once."""
    d = tmp_path_factory.mktemp("bad-inputs")
    tiny = Path(tiny_model)

    def jsonl(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    (d / "empty.jsonl").write_text("")
    (d / "header_only.csv").write_text("prompt,answer\n")
    (d / "malformed.jsonl").write_text('{"prompt": "What is 1 + 2?", "answer": \n')
    jsonl("no_answer.jsonl", [{"prompt": "What is 1 + 2?", "solution": "3"}])
    jsonl("long.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3"},
                         {"prompt": " ".join(["plus"] * 400), "answer": "4"}])  # > 256 positions
    jsonl("number_prompt.jsonl", [{"prompt": 12, "answer": "3"}])
    jsonl("pairs_no_rejected.jsonl", [{"prompt": "What is 1 + 2?", "chosen": "3"}])

    def model(name, drop=(), add=()):
        out = d / name
        shutil.copytree(tiny, out)
        for pattern in drop:
            for f in out.glob(pattern):
                f.unlink()
        for f, text in add:
            (out / f).write_text(text)
        return out

    model("no_weights", drop=["*.safetensors"])
    model("pickle_weights", drop=["*.safetensors"], add=[("pytorch_model.bin", "not read")])
    model("no_tokenizer", drop=["tokenizer.json"])
    model("missing_shard", drop=["*.safetensors"], add=[
        ("model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}})),
        ("model-00001-of-00002.safetensors", "")])
    return {"dir": str(d), "model": tiny_model}


# (id, family, overrides with {dir} / {model} placeholders, what the sentence must say)
CASES = [
    ("lm-negative-lr", "lm", ["lr=-1e-4"], r"lr must be > 0 \(got -0\.0001\)"),
    ("lm-zero-lr", "lm", ["lr=0"], r"lr must be > 0 \(got 0\.0\)"),
    ("lm-nan-temperature", "lm", ["temperature=.nan"], r"temperature must be > 0 \(got nan\)"),
    ("lm-fraction-over-1", "lm", ["gae_lambda=1.5"], r"gae_lambda must be in \[0, 1\] \(got 1\.5\)"),
    ("lm-clip-low-1", "lm", ["clip_range=1"], r"clip_range must be in \(0, 1\) \(got 1\.0\)"),
    ("lm-non-integer", "lm", ["group_size=2.5"], r"'group_size' must be int, got 2\.5"),
    ("lm-negative-count", "lm", ["warmup_steps=-1"], r"warmup_steps must be >= 0 \(got -1\)"),
    ("lm-negative-micro-batch", "lm", ["micro_batch_size=-1"], r"micro_batch_size must be >= 0 \(got -1\)"),
    ("lm-negative-lora-rank", "lm", ["lora_r=-1"], r"lora_r must be >= 0 \(got -1\)"),
    ("lm-tis-cap-below-1", "lm", ["tis_cap=0.5"], r"tis_cap must be >= 1 \(got 0\.5\)"),
    ("lm-tis-unknown", "lm", ["tis=row"], r"tis=.row. is not valid; choose one of auto, token, sequence, none"),
    ("lm-unknown-key", "lm", ["num_generations=4"], r"unknown recipe key 'num_generations'; did you mean group_size"),
    ("lm-empty-file", "lm", ["task={dir}/empty.jsonl"], r"task file '.*empty\.jsonl' is empty"),
    ("lm-header-only", "lm", ["task={dir}/header_only.csv"], r"header_only\.csv' is empty \(no data rows\)"),
    ("lm-malformed-file", "lm", ["task={dir}/malformed.jsonl"],
     r"task file '.*malformed\.jsonl' cannot be read as json"),
    ("lm-empty-eval-file", "lm", ["task={dir}/long.jsonl", "eval_task={dir}/empty.jsonl"],
     r"task file '.*empty\.jsonl' is empty"),
    ("lm-missing-reward-column", "lm", ["task={dir}/no_answer.jsonl"],
     r"no_answer\.jsonl' lacks columns \['answer'\]; reward 'arith_correct' has them"),
    ("lm-prompt-not-text", "lm", ["task={dir}/number_prompt.jsonl"], r"row 1 of task file .* has prompt 12"),
    ("lm-prompt-over-context", "lm", ["task={dir}/long.jsonl"],
     r"row 2 of task file .*long\.jsonl' has a prompt of \d+ tokens; .* but model .* has 256 "
     r"\(max_position_embeddings\)"),
    ("lm-generation-over-context", "lm", ["max_new_tokens=250"], r"with max_new_tokens=250 it needs \d+ positions"),
    ("lm-preference-file-columns", "lm", ["algo=reward_model", "task={dir}/pairs_no_rejected.jsonl"],
     r"preference file .* lacks columns \['rejected'\]; it needs prompt, chosen and rejected"),
    ("lm-model-without-weights", "lm", ["model={dir}/no_weights"], r"no_weights.* has no weights \(no \*\.safetensors"),
    ("lm-model-pickle-weights", "lm", ["model={dir}/pickle_weights"],
     r"pickle_weights.* has weights only as pickle files \['pytorch_model\.bin'\]"),
    ("lm-model-missing-shard", "lm", ["model={dir}/missing_shard"],
     r"lacks weight shards \['model-00002-of-00002\.safetensors'\] named in model\.safetensors\.index\.json"),
    ("lm-model-without-tokenizer", "lm", ["model={dir}/no_tokenizer"], r"no_tokenizer.* has no tokenizer files"),
    ("lm-model-missing", "lm", ["model={dir}/nowhere"], r"model path '.*nowhere' does not exist"),
    ("gym-negative-lr", "gym", ["lr=-0.1"], r"lr must be > 0 \(got -0\.1\)"),
    ("gym-zero-lr", "gym", ["lr=0"], r"lr must be > 0 \(got 0\.0\)"),
    ("gym-fraction-over-1", "gym", ["gamma=1.5"], r"gamma must be in \[0, 1\] \(got 1\.5\)"),
    ("gym-clip-range-0", "gym", ["clip_range=0"], r"clip_range must be in \(0, 1\)"),
    ("gym-non-integer", "gym", ["n_envs=2.5"], r"'n_envs' must be int, got 2\.5"),
    ("gym-special-value", "gym", ["gradient_steps=0"], r"gradient_steps must be >= 1 or -1 \(got 0\)"),
    ("gym-inf", "gym", ["max_grad_norm=.inf"], r"max_grad_norm must be >= 0 \(got inf\)"),
    ("gym-unknown-key", "gym", ["n_env=4"], r"unknown recipe key 'n_env'; did you mean n_envs"),
    ("gym-unknown-env", "gym", ["env=CartPol-v1"], r"unknown gymnasium env 'CartPol-v1'"),
]


def snapshot(path: Path) -> dict:
    """Every entry under ``path`` (and ``path`` itself) with its size and mtime in ns."""
    entries = [path, *sorted(path.rglob("*"))]
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in entries}


def existing_run(tmp_path: Path, family: str, model: str) -> Path:
    """A run directory that holds a run: its recipe, metrics, adapter and checkpoint files."""
    run = tmp_path / "existing"
    recipe, good = (LM_RECIPE, [f"model={model}", *LM_GOOD]) if family == "lm" else (GYM_RECIPE, GYM_GOOD)
    (run / "checkpoint").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(to_dict(load_recipe(recipe, good)), sort_keys=False))
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "checkpoint" / "state.pt").write_bytes(b"state")
    return run


@pytest.mark.parametrize("mode", ["new", "resume"])
@pytest.mark.parametrize("case, family, overrides, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_sentence_and_touches_no_run(case, family, overrides, pattern, mode, bad,
                                                                tmp_path, capsys):
    existing = existing_run(tmp_path, family, bad["model"])
    before = snapshot(existing)
    sets = [x.format(**bad) for x in overrides]
    if mode == "new":
        recipe, good = (LM_RECIPE, [f"model={bad['model']}", *LM_GOOD]) if family == "lm" else (GYM_RECIPE, GYM_GOOD)
        argv = ["train", recipe, "--run-dir", str(tmp_path / "new")] + [a for s in good + sets for a in ("--set", s)]
    else:
        argv = ["train", "--resume", str(existing)] + [a for s in sets for a in ("--set", s)]
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(existing) == before  # nothing written to a directory that holds a run
    assert not (tmp_path / "new").exists()  # and no run directory for a run that never started


def test_the_installed_entry_point_exits_2_with_one_line(tmp_path):
    """The same through a real process: the exit status and stderr a shell sees."""
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "train", GYM_RECIPE, "--run-dir", str(tmp_path / "r"),
                           "--set", "lr=-1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: lr must be > 0 (got -1.0); set it in the recipe or with --set lr=VALUE"
    assert not (tmp_path / "r").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(bad, tmp_path, capsys):
    """An error the preflight cannot see (a reward raising on its first call) stops the run
    before anything is logged: the directory it created is removed; the sentence stays."""
    reward = tmp_path / "broken.py"
    reward.write_text("def fn(prompts, completions, **kw):\n    raise RuntimeError('reward server down')\n")
    run = tmp_path / "r"
    code = main(["train", LM_RECIPE, "--no-progress", "--run-dir", str(run),
                 *[a for s in [f"model={bad['model']}", *LM_GOOD, f"rewards=[{reward}:fn]"] for a in ("--set", s)]])
    assert code == 2 and "reward server down" in capsys.readouterr().err
    assert not run.exists()


# ------------------------------------------------------------------- reward columns by signature
def test_reward_columns_come_from_parameters_without_defaults(tmp_path):
    (tmp_path / "r.py").write_text(
        "def needs(prompts, completions, answer, *, tests, limit=3, **kw): pass\n"
        "def closed(prompts, completions, completion_ids, trainer_state, answer): pass\n"
        "def positional(prompts, completions, /): pass\n")
    needed = reward_columns([f"{tmp_path}/r.py:needs", f"{tmp_path}/r.py:closed"])
    # not limit (default), kw, nor what every reward is given (prompts ... trainer_state)
    assert set(needed) == {"answer", "tests"}
    rows = [{"prompt": "p", "answer": "1", "tests": "t", "extra": 0}]
    check_rows(rows, "f", needed)  # a reward without **kwargs gets only what it names: extra is fine
    with pytest.raises(UserError, match=r"lacks columns \['tests'\]; reward '.*needs'"):
        check_rows([{"prompt": "p", "answer": "1"}], "f", needed)
    with pytest.raises(UserError, match="positional-only parameter 'prompts'"):
        reward_columns([f"{tmp_path}/r.py:positional"])
    assert reward_columns(["length_penalty"]) == {}  # max_chars has a default; **_ takes the rest
    assert reward_columns([lambda completions, ground_truth: None]) == {  # a callable (rlhf.train)
        "ground_truth": "reward '<lambda>' has them as parameters without a default"}


def test_max_prompt_length_counts_a_long_prompt_as_truncated(tiny_model):
    """The run keeps a prompt's last max_prompt_length tokens, so the context-window check counts
    a longer prompt as that long: a prompt that overflows the tiny model's 256 positions with
    max_new_tokens passes once max_prompt_length cuts it, and max_prompt_length=0 (off) does not."""
    from types import SimpleNamespace

    from rlhf.preflight import check_lengths

    rows = [{"prompt": "What is 1 + 2?"}, {"prompt": "seven " * 300}]
    cfg = SimpleNamespace(model=tiny_model, max_new_tokens=4, max_prompt_length=0)
    with pytest.raises(UserError, match=r"row 2 of f has a prompt of \d+ tokens; with max_new_tokens=4"):
        check_lengths(cfg, tiny_model, [("f", rows)])
    cfg.max_prompt_length = 200  # 200 + 4 <= 256
    check_lengths(cfg, tiny_model, [("f", rows)])
    cfg.max_prompt_length = 253  # 253 + 4 > 256
    with pytest.raises(UserError, match="row 2 of f"):
        check_lengths(cfg, tiny_model, [("f", rows)])
