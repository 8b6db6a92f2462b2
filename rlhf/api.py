"""The Python API: what ``rlhf train`` and ``rlhf eval`` do, from a notebook or a script.

    import rlhf

    result = rlhf.train("grpo_arith", rewards=[my_reward], dataset=[{"prompt": ..., "answer": ...}],
                        steps=20, model="HuggingFaceTB/SmolLM2-135M-Instruct")
    result.metrics[-1]["reward"], result.run_dir
    result.policy.generate("What is 2 + 3?")
    rlhf.evaluate(result)

A recipe is an installed recipe's name, a YAML file or a dict; keyword arguments override its keys
with the same checks (and the same one-sentence ``UserError``) as ``--set``. ``rewards`` holds
names or callables (sync or ``async def``), each alone or as ``{fn: weight}``; ``dataset`` a
``datasets.Dataset``, a list of dicts or a pandas DataFrame, written into the run directory
(``RUN_DIR/dataset``, Arrow) so the run can be evaluated and resumed from the command line too.
``recipe.yaml`` names each callable by ``module:function`` when it can be imported, else
``callable:NAME`` (then ``rlhf.evaluate`` needs it again: ``rewards=``; a TrainResult keeps it).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rlhf.errors import UserError

DATASET_DIR, EVAL_DATASET_DIR = "dataset", "eval_dataset"


@dataclass
class TrainResult:
    """What ``rlhf.train`` returns: the run directory, the resolved config, the summary that
    ``rlhf train`` prints, one metrics row per step, and (LM runs) the trained policy."""

    run_dir: Path
    config: object
    summary: dict
    metrics: list[dict]
    rewards: list | None = None  # the reward specs given to train (callables kept): rlhf.evaluate reuses them
    _policy: Policy | None = field(default=None, repr=False)

    @property
    def final(self) -> dict:
        """The last step's metrics ({} when no step ran)."""
        return self.metrics[-1] if self.metrics else {}

    @property
    def policy(self) -> Policy:
        """The trained model and tokenizer (loaded from ``run_dir/adapter`` on first use)."""
        if not hasattr(self.config, "model"):
            raise UserError(f"{self.run_dir} is a gym run; its policy is the checkpoint in that directory "
                            "(rlhf.evaluate runs it)")
        if self._policy is None:
            self._policy = Policy(self.run_dir)
        return self._policy


class Policy:
    """A trained LM run's policy: its base model with the run's LoRA adapter, in eval mode."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from rlhf.lm.share import load_adapted

            self._loaded = load_adapted(str(self.run_dir))
        return self._loaded

    @property
    def model(self):
        """The PEFT model (base + adapter), as ``rlhf generate`` uses it."""
        return self._load()[0]

    @property
    def tokenizer(self):
        return self._load()[1]

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        """The reply to a text or to chat messages (through the chat template); temperature 0: greedy."""
        from rlhf.lm.share import reply

        return reply(self.model, self.tokenizer, prompt, max_new_tokens, temperature)


def train(recipe: str | Path | dict = "grpo_arith", rewards=None, dataset=None, *, eval_dataset=None,
          run_dir: str | Path | None = None, progress: bool = True, **overrides) -> TrainResult:
    """Train from ``recipe`` with ``overrides`` (recipe keys), ``rewards`` and ``dataset`` (see the
    module docstring); the run directory is ``run_dir``, else ``out_dir/<recipe>-<time>``;
    ``progress``: a progress bar (tqdm.auto: a widget in a notebook)."""
    from rlhf.cli import _new_dir, _remove_unstarted
    from rlhf.config import build, config_class
    from rlhf.preflight import preflight
    from rlhf.rewards import recipe_rewards
    from rlhf.run import Run
    from rlhf.trainers import get_trainer

    recipe_path, values = _recipe_values(recipe)
    values.update(overrides)
    rewards = _as_list(rewards)
    cls = config_class(values)
    for what, given in (("rewards", rewards), ("dataset", dataset), ("eval_dataset", eval_dataset)):
        if given is not None and "rewards" not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"{what}= applies to language-model recipes; algo {values.get('algo')!r} trains a gym "
                            "agent on its environment")
    if rewards is not None:
        values["rewards"] = recipe_rewards(rewards)  # names: what recipe.yaml can hold
    staged = {}
    try:
        for key, data, name in (("task", dataset, DATASET_DIR), ("eval_task", eval_dataset, EVAL_DATASET_DIR)):
            if data is not None:
                staged[key] = (_stage(data, key), name)
                values[key] = str(staged[key][0])
        cfg = build(cls, values)  # the CLI's checks, the CLI's sentences
        given = dataclasses.replace(cfg, rewards=rewards) if rewards is not None else cfg  # callables kept
        preflight(given)
        fresh = _new_dir(cfg, run_dir)
        run = Run(cfg, recipe_path, None if run_dir is None else str(run_dir))
    except BaseException as exc:
        _unstage(staged, exc)
        raise
    try:
        if staged:  # the data moves into the run directory; recipe.yaml names it there
            for key, (path, name) in staged.items():
                target = (run.dir / name).resolve()
                shutil.move(str(path), str(target))
                shutil.rmtree(path.parent, ignore_errors=True)
                setattr(cfg, key, str(target))
                setattr(given, key, str(target))
            run.write_recipe(cfg)
        summary = get_trainer(cfg)(given, run, progress=progress, resume=False)
    except UserError:
        if fresh:
            _remove_unstarted(run)
        raise
    finally:
        run.close()
    return TrainResult(run.dir, cfg, summary, list(run.history), rewards)


def evaluate(run, problems: int | None = None, rewards=None, progress: bool = False, episodes: int = 20) -> dict:
    """``rlhf eval`` of a run directory or a ``TrainResult``: LM runs, the base model vs the trained
    adapter on ``problems`` held-out prompts (default: the recipe's ``eval_problems``), scored by
    the run's rewards or ``rewards``; reward-model runs, pairwise accuracy; gym runs, ``episodes``."""
    from rlhf.config import load_run_config
    from rlhf.trainers import get_evaluator

    run_dir = run.run_dir if isinstance(run, TrainResult) else Path(run)
    rewards = _as_list(rewards)
    if rewards is None and isinstance(run, TrainResult):
        rewards = run.rewards
    cfg = load_run_config(str(run_dir))
    if rewards is not None:
        if not hasattr(cfg, "rewards"):
            raise UserError(f"rewards= applies to language-model runs; {str(run_dir)!r} is a gym run")
        cfg = dataclasses.replace(cfg, rewards=rewards)
    from rlhf.run import announce_code

    announce_code(cfg, f"evaluating {run_dir}")
    args = SimpleNamespace(problems=problems, episodes=episodes, no_progress=not progress)
    return get_evaluator(cfg)(str(run_dir), cfg, args)


def _as_list(rewards) -> list | None:
    """``rewards`` as a list: one name, function or {name: weight} alone is a list of one."""
    if rewards is None:
        return None
    return [rewards] if isinstance(rewards, (str, dict)) or callable(rewards) else list(rewards)


def _recipe_values(recipe) -> tuple[str | None, dict]:
    """(the recipe file, for naming the run directory; its key: value mapping)."""
    from rlhf.catalog import find_recipe
    from rlhf.config import read_recipe

    if isinstance(recipe, dict):
        return None, dict(recipe)
    if isinstance(recipe, (str, Path)):
        path = find_recipe(str(recipe))
        return path, read_recipe(path)
    raise UserError(f"recipe must be an installed recipe's name, a YAML file's path or a dict of recipe keys, "
                    f"got {type(recipe).__name__}")


def _unstage(staged: dict, exc: BaseException) -> None:
    """Remove the staged data of a run that did not start; a ``UserError`` about it is raised
    again naming the rows as the caller gave them, not by their temporary place."""
    for path, _ in staged.values():
        shutil.rmtree(path.parent, ignore_errors=True)
    if isinstance(exc, UserError) and staged:
        text = str(exc)
        for key, (path, _) in staged.items():
            text = text.replace(repr(str(path)), f"(the rows given as {'dataset' if key == 'task' else key}=)")
        raise UserError(text) from None


def _stage(data, key: str) -> Path:
    """``data`` written (Arrow, ``save_to_disk``) into a new temporary directory; its path."""
    import datasets

    what = "dataset" if key == "task" else "eval_dataset"
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise UserError(f"{what} is a DatasetDict with splits {list(data)}; pass one split, e.g. {what}=ds['train']")
    if isinstance(data, datasets.IterableDataset):
        raise UserError(f"{what} is an IterableDataset (streamed); pass a Dataset, e.g. "
                        "Dataset.from_list(list(ds.take(N)))")
    try:
        if isinstance(data, list):
            if not data or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{what} must be a non-empty list of dicts (one per row, with a 'prompt'), "
                                f"a datasets.Dataset or a pandas DataFrame")
            data = datasets.Dataset.from_list(data)
        elif hasattr(data, "columns") and hasattr(data, "to_dict"):  # a pandas DataFrame
            data = datasets.Dataset.from_pandas(data, preserve_index=False)
        elif not isinstance(data, datasets.Dataset):
            raise UserError(f"{what} must be a datasets.Dataset, a list of dicts or a pandas DataFrame, "
                            f"got {type(data).__name__}")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's refusal of the rows (mixed types in a column)
        raise UserError(f"{what} cannot be made a table: {str(exc).splitlines()[0][:200]}; give every row the "
                        "same columns with one type each") from None
    path = Path(tempfile.mkdtemp(prefix="rlhf-data-")) / "data"
    data.save_to_disk(str(path))
    return path
