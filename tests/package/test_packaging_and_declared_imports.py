"""Packaging: every import declared, the wheel ships recipes + LICENSE, recipes run by name,
`rlhf keys` documents every key, `--version`, and only library warnings are silenced."""
import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest

import rlhf
from rlhf.cli import main
from rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
# imports that belong to an extra, not to the base install: module -> extra
OPTIONAL = {"deepspeed": "deepspeed", "math_verify": "math", "ale_py": "atari",
            "minatar": "minatar", "mujoco": "mujoco"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, str]:
    """Top-level module -> first file importing it, for every absolute import in rlhf/ and rewards/
    (those inside functions too), minus the standard library and our own packages."""
    found: dict[str, str] = {}
    for root in ("rlhf", "rewards"):
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("rlhf", "rewards"):
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))


def test_every_direct_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    extras = {k: {_requirement_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    dists = importlib.metadata.packages_distributions()
    imported = _imported_modules()
    assert {"torch", "transformers", "peft", "huggingface_hub", "numpy", "yaml"} <= set(imported)  # the scan works
    problems = []
    for module, where in sorted(imported.items()):
        if module not in dists:
            problems.append(f"{module} (imported in {where}) is not installed here, so its distribution is unknown")
            continue
        names = {_norm(d) for d in dists[module]}
        declared = extras[OPTIONAL[module]] if module in OPTIONAL else base
        if not names & declared:
            problems.append(f"{module} (imported in {where}, distribution {sorted(names)}) is not declared")
    assert not problems, problems


def test_wheel_ships_recipes_license_version_and_metadata(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the worktree
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "build", "*.egg-info", ".pytest_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("rlhf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"rlhf-{rlhf.__version__}.dist-info/METADATA").decode()
        shipped = {Path(n).name for n in names if n.startswith("rlhf/recipes/") and n.endswith(".yaml")}
        assert z.read("rlhf/recipes/grpo_arith.yaml") == (ROOT / "recipes" / "grpo_arith.yaml").read_bytes()
    assert shipped == {p.name for p in (ROOT / "recipes").rglob("*.yaml")}
    assert f"rlhf-{rlhf.__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in meta and "Requires-Dist: huggingface_hub" in meta
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert "END OF TERMS AND CONDITIONS" in (ROOT / "LICENSE").read_text()  # the full text


def test_recipes_run_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    from rlhf.catalog import find_recipe, recipes_dir

    monkeypatch.chdir(tmp_path)
    assert Path(find_recipe("grpo_arith")) == recipes_dir() / "grpo_arith.yaml"
    assert Path(find_recipe("grpo_arith.yaml")) == recipes_dir() / "grpo_arith.yaml"
    (tmp_path / "grpo_arith.yaml").write_text("algo: grpo\n")  # a file of that name here wins
    assert find_recipe("grpo_arith.yaml") == "grpo_arith.yaml"
    assert find_recipe("my/recipe.yaml") == "my/recipe.yaml"  # a path stays a path
    with pytest.raises(UserError, match="'grpo_arth' is neither a file nor an installed recipe; did you mean grpo_arith"):
        find_recipe("grpo_arth")
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1])["recipes"] == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    line = next(x for x in out if x.startswith("grpo_arith "))
    assert line.split(None, 1)[1] == "GRPO teaches SmolLM2-135M-Instruct two-digit addition on a CPU."


def test_keys_prints_every_key_with_default_and_its_comment(capsys):
    from rlhf.config import AgentConfig, LMConfig
    from rlhf.gym.config import GymConfig

    assert main(["keys", "grpo"]) == 0  # the LM family, then the agent family (LM keys and its own)
    out = capsys.readouterr().out.splitlines()
    assert [x for x in out if x.startswith(("LMConfig:", "AgentConfig:"))] == [
        "LMConfig: algo grpo | rloo | reinforce | ppo | reward_model", "AgentConfig: algo grpo | rloo | reinforce | ppo"]
    rows = {x.split()[0]: x for x in out if x.startswith("  ")}
    lm_keys = [f.name for f in LMConfig.__dataclass_fields__.values()]
    assert list(rows) == lm_keys + [f for f in AgentConfig.__dataclass_fields__ if f not in lm_keys]
    assert re.fullmatch(r"  lr\s+0\.0002\s+AdamW learning rate of the adapter", rows["lr"])
    # a comment wrapped onto the next line is read whole
    assert rows["reward_timeout_s"].endswith("with one line naming both, and the run goes on (0: no limit)")
    assert main(["keys", "ppo"]) == 0  # both families have a ppo
    out = capsys.readouterr().out
    assert "LMConfig:" in out and "GymConfig:" in out and "ppo clip epsilon" in out
    from rlhf.catalog import field_docs

    for cls in (LMConfig, AgentConfig, GymConfig):  # every key has its one-line doc
        docs = field_docs(cls)
        assert [f for f in cls.__dataclass_fields__ if not docs.get(f)] == []
    assert "--- on-policy" not in field_docs(GymConfig)["clip_obs"]  # a section comment is not a doc
    assert main(["keys", "nope"]) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"rlhf {rlhf.__version__}"


def test_library_chatter_is_silenced_but_a_users_reward_warning_shows(tiny_model, tmp_path):
    """A reward function of the user's that warns is heard through `rlhf train`; the same warning
    attributed to a library module is not."""
    reward = tmp_path / "my_reward.py"
    reward.write_text("import warnings\n\ndef picky(completions, **kw):\n"
                      "    warnings.warn('picky: the completions are empty')\n"
                      "    return [0.0 for _ in completions]\n")
    argv = ["train", "grpo_arith", "--no-progress", "--run-dir", str(tmp_path / "run")]
    for item in (f"model={tiny_model}", f"rewards=[{reward}:picky]", "steps=1", "prompts_per_step=2",
                 "group_size=2", "max_new_tokens=2", "lora_r=2", "threads=1"):
        argv += ["--set", item]
    with warnings.catch_warnings(record=True) as seen:
        assert main(argv) == 0
        for lib in ("transformers.generation.utils", "torch.nn.modules.module", "peft.tuners.lora"):
            warnings.warn_explicit("library chatter", UserWarning, "lib.py", 1, module=lib)
        warnings.warn_explicit("not a library", UserWarning, "mine.py", 1, module="torchvision_user_code")
    messages = [str(w.message) for w in seen]
    assert "picky: the completions are empty" in messages
    assert "library chatter" not in messages and "not a library" in messages
