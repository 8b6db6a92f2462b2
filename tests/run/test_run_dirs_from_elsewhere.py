"""A run directory may come from someone else: no write follows a link the run did not make, a
broken line of metrics.jsonl is named and no row is lost, the report escapes every field, an
unreadable checkpoint falls back to the previous one, and the code a recipe names is named
before ``--resume`` or ``rlhf eval`` imports it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rlhf import checkpoint
from rlhf.cli import main
from rlhf.config import LMConfig
from rlhf.errors import UserError
from rlhf.gym.config import GymConfig
from rlhf.report import write_report
from rlhf.run import Run, announce_code, code_named
from rlhf.storage import Slot, append_file, lock_run_dir, replace_file, unlock

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SECRET = b"the user's own file, which no run may touch\n"

# every name the trainer writes at the top of a run directory, and the temporaries it makes there
PLANTED = ["run.lock", "report.html", ".metrics.jsonl.tmp", "metrics.jsonl", "recipe.yaml", ".recipe.yaml.tmp",
           "completions.jsonl", "reward.png", "return.png", ".reward.png.tmp", ".report.html.tmp", "adapter",
           "checkpoint", "policy", "reward_model", "tensorboard", "debug", "wandb", ".checkpoint-000001.tmp",
           "checkpoint-000001", ".checkpoint.link", ".policy-000001.tmp", "dataset"]


def outside(tmp_path: Path) -> tuple[Path, Path]:
    """A file and a directory outside the run directory, with content to compare afterwards."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_bytes(SECRET)
    (out / "dir").mkdir()
    (out / "dir" / "kept.txt").write_bytes(SECRET)
    return out / "secret.txt", out / "dir"


def untouched(target_file: Path, target_dir: Path) -> bool:
    return target_file.read_bytes() == SECRET and sorted(os.listdir(target_dir)) == ["kept.txt"] and \
        (target_dir / "kept.txt").read_bytes() == SECRET


def every_write(run: Run) -> None:
    """What a run writes into its directory, each once."""
    run.log({"step": 1, "reward": 0.5})
    run.append("completions.jsonl", [{"step": 1, "prompt": "p", "completion": "c"}])
    run.write_recipe(LMConfig())
    run.plot("reward")
    run.save_atomic("policy", lambda d: (d.mkdir(), (d / "w.txt").write_text("w")))
    checkpoint.publish(run, 1, lambda d: ((d / "adapter").mkdir(), (d / "state.pt").write_text("s")),
                       follow=checkpoint.LM_FOLLOW)
    run.dump_tensors(1, 0)
    write_report(run.dir)
    run.truncate_history(1)


@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_planted_link_is_never_written_through(name, kind, tmp_path):
    target_file, target_dir = outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(target_file if kind == "file" else target_dir, run_dir / name)
    try:
        run = Run(LMConfig(), run_dir=str(run_dir), resume=True)
    except UserError as exc:
        assert "\n" not in str(exc) and ("did not make" in str(exc) or "already holds a run" in str(exc)), exc
    else:  # (only where the link is harmless)
        every_write(run)
        run.close()
    assert untouched(target_file, target_dir)


def test_links_made_after_the_run_started_are_not_followed_either(tmp_path):
    """The files themselves are opened with O_NOFOLLOW / O_EXCL or replaced by a rename."""
    target_file, target_dir = outside(tmp_path)
    run = Run(LMConfig(), run_dir=str(tmp_path / "run"))
    run.log({"step": 1, "reward": 0.5})
    for name in ("report.html", ".metrics.jsonl.tmp", ".completions.jsonl.tmp", "reward.png", ".reward.png.tmp",
                 "debug", ".checkpoint-000002.tmp", ".policy-000001.tmp"):
        os.symlink(target_file if name != "debug" else target_dir, run.dir / name)
    write_report(run.dir)
    run.truncate_history(1)
    run.plot("reward")
    run.save_atomic("policy", lambda d: (d.mkdir(), (d / "w.txt").write_text("w")))
    checkpoint.publish(run, 2, lambda d: (d / "state.pt").write_text("s"))
    (run.dir / "completions.jsonl").write_text("")
    run.truncate_history(1)
    for name in ("metrics.jsonl", "completions.jsonl"):
        os.unlink(run.dir / name)
        os.symlink(target_file, run.dir / name)
    with pytest.raises(UserError, match="did not make"):
        run.log({"step": 2})
    with pytest.raises(UserError, match="did not make"):
        run.append("completions.jsonl", [{"step": 2}])
    with pytest.raises(UserError, match="did not make"):
        run.dump_tensors(2, 0)
    run.close()
    os.unlink(run.dir / "run.lock")
    os.symlink(target_file, run.dir / "run.lock")
    with pytest.raises(UserError, match="did not make"):
        lock_run_dir(run.dir)
    assert untouched(target_file, target_dir)


def test_hard_links_keep_their_other_names_content(tmp_path):
    """A file hard-linked to another name (planted, or ``cp -al``) gets a private copy first."""
    target_file, _ = outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(target_file, run_dir / "completions.jsonl")
    os.link(target_file, run_dir / "run.lock")
    append_file(run_dir / "completions.jsonl", b"{}\n")
    fd = lock_run_dir(run_dir)
    unlock(fd)
    replace_file(run_dir / "report.html", b"x")
    assert target_file.read_bytes() == SECRET
    assert (run_dir / "completions.jsonl").read_bytes() == SECRET + b"{}\n"


def test_a_planted_link_stops_a_real_run_in_one_sentence(tmp_path, capsys):
    target_file, target_dir = outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(target_file, run_dir / "return.png")
    args = ["train", str(RECIPES / "q_learning_frozenlake.yaml"), "--run-dir", str(run_dir), "--no-progress",
            "--set", "total_steps=500", "--set", "log_every=250", "--set", "eval_episodes=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "did not make" in err[-1] and "return.png" in err[-1]
    assert untouched(target_file, target_dir)
    os.unlink(run_dir / "return.png")
    assert main(args) == 0  # (the link removed, the same directory trains)


# ------------------------------------------------------------------ metrics.jsonl with a broken line
def write_rows(path: Path, lines: list[str]) -> bytes:
    data = "".join(x + "\n" for x in lines).encode()
    path.write_bytes(data)
    return data


def test_a_broken_line_among_the_kept_rows_stops_the_resume_untouched(tmp_path):
    run = Run(LMConfig(), run_dir=str(tmp_path / "run"))
    rows = [json.dumps({"step": s, "reward": s / 10}) for s in range(1, 7)]
    data = write_rows(run.metrics_path, rows[:2] + ['{"step": 3, "rew'] + rows[3:])
    with pytest.raises(UserError) as exc:
        run.truncate_history(4)
    assert "line 3 of" in str(exc.value) and "\n" not in str(exc.value)
    assert run.metrics_path.read_bytes() == data


def test_a_broken_line_after_the_kept_rows_is_named_and_no_row_is_lost(tmp_path, caplog):
    run = Run(LMConfig(), run_dir=str(tmp_path / "run"))
    rows = [json.dumps({"step": s, "reward": s / 10}) for s in range(1, 7)]
    write_rows(run.metrics_path, rows[:4] + ["garbage"] + rows[5:] + ['{"step": 7, "torn'])
    with caplog.at_level("WARNING", logger="rlhf"):
        run.truncate_history(4)
    assert "line 5 is not a JSON row" in caplog.text
    assert [r["step"] for r in run.history] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in run.metrics_path.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_with_a_broken_line_in_the_middle_is_refused_with_the_file_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", str(RECIPES / "q_learning_frozenlake.yaml"), "--run-dir", str(run_dir), "--no-progress",
            "--set", "total_steps=3000", "--set", "log_every=500", "--set", "save_every=1000",
            "--set", "eval_episodes=2"]
    assert main(args) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    data = write_rows(run_dir / "metrics.jsonl", lines)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "line 2 of" in err[-1] and "untouched" in err[-1]
    assert (run_dir / "metrics.jsonl").read_bytes() == data


# ------------------------------------------------------------------ the report escapes every field
HOSTILE = "</pre><script>alert(1)</script>"
ATTR = "\" onmouseover=\"alert(2)\" x='"


def test_every_field_of_the_report_is_escaped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recipe = {"algo": HOSTILE, "model": ATTR, "task": HOSTILE, "rewards": [f"{HOSTILE}.py:fn", {ATTR: 1.0}],
              "lr": ATTR, "seed": HOSTILE, HOSTILE: ATTR}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    metrics = [{"step": s, "reward": 0.1 * s, f"rewards/{HOSTILE}": 0.2, f"rewards/{ATTR}": 0.3, HOSTILE: 1.0,
                ATTR: 2.0, "kl": ATTR} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    samples = [{"step": s, "prompt": ATTR + HOSTILE, "completion": HOSTILE + ATTR, "reward": HOSTILE,
                "rewards": {HOSTILE: ATTR, ATTR: HOSTILE}, "advantage": ATTR, "length": HOSTILE,
                "truncated": False} for s in (1, 2, 3)]
    (run / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    page = write_report(run).read_text()
    assert "<script" not in page.lower() and "onmouseover=\"" not in page and "x='" not in page
    assert page.count("</pre>") == 1  # the recipe's own <pre> only
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ------------------------------------------------------------------ an unreadable checkpoint
from tests.run.test_resume_every_run_kind import Stop, rows, stop_after  # noqa: E402


def weights(run: Path, name: str) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((run / name).rglob("*.safetensors"))}


def corrupt_then_resume(tmp_path, monkeypatch, capsys, caplog, train_args, k, damage, out) -> str:
    """Train once whole; once stopped after ``k`` checkpoints, ``damage(newest checkpoint)``,
    resume: the resumed run ends as the whole one did. Returns the resume's stderr."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *train_args, "--run-dir", str(full)]) == 0
    with monkeypatch.context() as m:
        stop_after(m, k)
        with pytest.raises(Stop):
            main(["train", *train_args, "--run-dir", str(cut)])
    capsys.readouterr()
    versions = sorted(p.name for p in cut.glob("checkpoint-*"))
    assert len(versions) == 2, versions  # keep_checkpoints: 2 by default
    newest = (cut / "checkpoint").resolve()
    damage(newest)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf"):
        assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    err = caplog.text
    assert rows(cut) == rows(full)
    assert weights(cut, out) == weights(full, out) and weights(full, out)
    assert (cut / f"corrupt-{newest.name}").is_dir()
    return err


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_lm_resume_falls_back_past_a_truncated_state(tiny_model, tmp_path, monkeypatch, capsys, caplog):
    args = [str(RECIPES / "grpo_arith.yaml"), "--no-progress", "--set", f"model={tiny_model}", "--set", "steps=3",
            "--set", "save_every=1", "--set", "threads=1", "--set", "prompts_per_step=2", "--set", "group_size=2",
            "--set", "max_new_tokens=3", "--set", "lora_r=2", "--set", "lora_alpha=4", "--set", "lr=0.05"]
    err = corrupt_then_resume(tmp_path, monkeypatch, capsys, caplog, args, 2, lambda d: truncate(d / "state.pt"),
                              "adapter")
    assert "checkpoint-000002" in err and "cannot be read (state.pt" in err and "checkpoint-000001" in err


def test_lm_resume_falls_back_past_garbled_adapter_weights(tiny_model, tmp_path, monkeypatch, capsys, caplog):
    args = [str(RECIPES / "grpo_arith.yaml"), "--no-progress", "--set", f"model={tiny_model}", "--set", "steps=3",
            "--set", "save_every=1", "--set", "threads=1", "--set", "prompts_per_step=2", "--set", "group_size=2",
            "--set", "max_new_tokens=3", "--set", "lora_r=2", "--set", "lora_alpha=4", "--set", "lr=0.05"]

    def garble(d: Path) -> None:
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    err = corrupt_then_resume(tmp_path, monkeypatch, capsys, caplog, args, 2, garble, "adapter")
    assert "adapter/adapter_model.safetensors" in err


def test_gym_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, monkeypatch, capsys, caplog):
    args = [str(RECIPES / "ppo_cartpole.yaml"), "--no-progress", "--set", "seed=3", "--set", "threads=1",
            "--set", "eval_episodes=2", "--set", "total_steps=1024", "--set", "n_envs=4", "--set", "n_steps=32",
            "--set", "epochs=2", "--set", "log_every=128", "--set", "save_every=256", "--set", "norm_obs=true"]

    def damage(d: Path) -> None:
        truncate(d / "policy" / "model.safetensors")
        truncate(d / "state.pt")
    err = corrupt_then_resume(tmp_path, monkeypatch, capsys, caplog, args, 3, damage, "policy")
    assert "cannot be read" in err


def test_no_readable_checkpoint_is_one_sentence(tmp_path):
    (tmp_path / "recipe.yaml").write_text("keep_checkpoints: 2\n")
    Slot(tmp_path, "checkpoint").publish(1, lambda d: (d / "state.pt").write_bytes(b"torn"))
    with pytest.raises(UserError, match=r"cannot be read \(state.pt: .*no older complete checkpoint"):
        checkpoint.latest(tmp_path)


def test_keep_checkpoints_is_checked_and_kept(tmp_path):
    for cls in (LMConfig, GymConfig):
        with pytest.raises(UserError, match="keep_checkpoints"):
            from rlhf.config import build

            build(cls, {"keep_checkpoints": 0, **({"env": "CartPole-v1", "algo": "ppo"} if cls is GymConfig else {})})
    import dataclasses

    run = Run(dataclasses.replace(LMConfig(), keep_checkpoints=3), run_dir=str(tmp_path / "run"))
    for step in range(1, 6):
        checkpoint.publish(run, step, lambda d: (d / "state.pt").write_text("s"))
    assert sorted(p.name for p in run.dir.glob("checkpoint-*")) == [f"checkpoint-00000{s}" for s in (3, 4, 5)]


# ------------------------------------------------------------------ code a run directory names
def test_code_is_named_without_being_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "evilpkg"
    (pkg / "sub").mkdir(parents=True)
    marker = tmp_path / "imported"
    for init in (pkg / "__init__.py", pkg / "sub" / "__init__.py", pkg / "sub" / "rewards.py"):
        init.write_text(f"open({str(marker)!r}, 'a').write('{init.name}')\n")
    (tmp_path / "my_reward.py").write_text(f"open({str(marker)!r}, 'a').write('file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = SimpleNamespace(rewards=["arith_correct", "./my_reward.py:fn", {"evilpkg.sub.rewards:score": 0.5},
                                   "rm:runs/rm/reward_model", "callable:lambda", "no_such_module:f"],
                          env=None)
    names = code_named(cfg)
    assert names == [str(tmp_path / "my_reward.py"), str(pkg / "sub" / "rewards.py"),
                     "reward model runs/rm/reward_model", "module no_such_module"]
    assert not marker.exists()
    assert code_named(SimpleNamespace(env="evilpkg.sub:Env-v0")) == [str(pkg / "sub" / "__init__.py")]
    assert announce_code(SimpleNamespace(rewards=["arith_correct"], env=None)) == []


def test_resume_names_the_code_before_importing_it(tmp_path, capsys):
    evil = tmp_path / "evil.py"
    evil.write_text("import sys\nprint('EVIL IMPORTED', file=sys.stderr)\ndef fn(completions, **kw):\n"
                    "    return [0.0] * len(completions)\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"algo": "grpo", "rewards": [f"{evil}:fn"]}))
    main(["train", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "imports and runs code" in x)
    assert str(evil) in line and "EVIL IMPORTED" in err  # (the preflight imports it to check its signature)
    assert err.index(line) < err.index("EVIL IMPORTED")


def test_run_does_not_import_the_config():
    """rlhf/run.py sits below the recipes' config (it writes recipe.yaml from any dataclass)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[2] / "rlhf" / "run.py").read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {n for n in names if n and n.startswith("rlhf.") and n not in ("rlhf.errors", "rlhf.storage", "rlhf.run_dir_guard")}


@pytest.mark.parametrize("name", ["metrics.jsonl", "run.lock"])
def test_a_directory_or_fifo_in_place_of_a_run_file_is_one_sentence(name, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        lock_run_dir(run_dir) if name == "run.lock" else append_file(run_dir / name, b"{}\n")
    os.rmdir(run_dir / name)
    os.mkfifo(run_dir / name)
    with pytest.raises(UserError, match="neither a file nor a directory"):
        Run(LMConfig(), run_dir=str(run_dir), resume=True)
    with pytest.raises(UserError, match="not a regular file"):
        lock_run_dir(run_dir) if name == "run.lock" else append_file(run_dir / name, b"{}\n")


def test_the_runs_own_links_pass_and_lookalikes_do_not(tmp_path):
    from rlhf.run_dir_guard import check_links

    run = tmp_path / "run"
    (run / "checkpoint-000002" / "adapter").mkdir(parents=True)
    os.symlink("checkpoint-000002", run / "checkpoint")
    os.symlink("checkpoint-000002/adapter", run / "adapter")
    os.symlink("policy-000007", run / "policy")  # (dangling: recovery re-points it)
    check_links(run)
    for target in ("checkpoint-000002/../../outside", str(run / "checkpoint-000002"), "../run/checkpoint-000002"):
        os.symlink(target, run / "reward_model")
        with pytest.raises(UserError, match="did not make"):
            check_links(run)
        os.unlink(run / "reward_model")
    os.symlink(tmp_path, run / "checkpoint-000002" / "adapter" / "escape")
    with pytest.raises(UserError, match="did not make"):
        check_links(run)
