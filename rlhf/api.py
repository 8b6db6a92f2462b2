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

The command line is a shell over this module: ``rlhf train`` builds its config from the recipe
file and ``--set``, then calls ``run_recipe`` as ``train`` does; ``rlhf eval`` is ``evaluate``;
``rlhf generate`` and ``rlhf chat`` use ``Policy``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
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

    def load(self) -> tuple:
        """(model, tokenizer), loaded now if not yet (else on first use)."""
        if self._loaded is None:
            from rlhf.lm.share import load_adapted

            self._loaded = load_adapted(str(self.run_dir))
        return self._loaded

    @property
    def model(self):
        """The PEFT model (base + adapter), as ``rlhf generate`` uses it."""
        return self.load()[0]

    @property
    def tokenizer(self):
        return self.load()[1]

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        """The reply to a text or to chat messages (through the chat template); temperature 0: greedy."""
        from rlhf.lm.share import reply

        return reply(self.model, self.tokenizer, prompt, max_new_tokens, temperature)


def train(recipe: str | Path | dict = "grpo_arith", rewards=None, dataset=None, *, eval_dataset=None,
          run_dir: str | Path | None = None, progress: bool = True, **overrides) -> TrainResult:
    """Train from ``recipe`` with ``overrides`` (recipe keys), ``rewards`` and ``dataset`` (see the
    module docstring); the run directory is ``run_dir``, else ``out_dir/<recipe>-<time>``;
    ``progress``: a progress bar (tqdm.auto: a widget in a notebook)."""
    from rlhf.config import build, config_class
    from rlhf.rewards import recipe_rewards

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
    if (dataset is not None or eval_dataset is not None) and _world() > 1:  # each process would move its copy
        raise UserError("dataset= and eval_dataset= run in one process; under accelerate launch save the rows "
                        "(Dataset.save_to_disk(PATH)) and pass task=PATH (eval_task=PATH)")
    staged: dict = {}
    try:
        for key, data, name in (("task", dataset, DATASET_DIR), ("eval_task", eval_dataset, EVAL_DATASET_DIR)):
            if data is not None:
                staged[key] = (_stage(data, key), name)
                values[key] = str(staged[key][0])
        cfg = build(cls, values)  # the CLI's checks, the CLI's sentences
        given = dataclasses.replace(cfg, rewards=rewards) if rewards is not None else cfg  # callables kept

        def move_data(run) -> None:  # the data moves into the run directory; recipe.yaml names it there
            for key, (path, name) in list(staged.items()):
                target = (run.dir / name).resolve()
                shutil.move(str(path), str(target))
                shutil.rmtree(path.parent, ignore_errors=True)
                del staged[key]
                setattr(cfg, key, str(target))
                setattr(given, key, str(target))
            run.write_recipe(cfg)

        run, summary = run_recipe(cfg, recipe_path, None if run_dir is None else str(run_dir), given=given,
                                  progress=progress, prepare=move_data if staged else None)
    except BaseException as exc:
        _unstage(staged, exc)  # whatever was not moved into a run directory
        raise
    return TrainResult(run.dir, cfg, summary, list(run.history), rewards)


def run_recipe(cfg, recipe: str | None = None, run_dir: str | None = None, *, resume: bool = False,
               progress: bool = True, given=None, prepare=None, announce: bool = False):
    """What ``rlhf train`` and ``rlhf.train`` both do with a built config: the preflight, the run
    directory (made by the main process when several run), the trainer, and the push to the Hub
    the recipe asks for; returns ``(run, summary)``, the run closed. ``given``: the config the
    preflight and the trainer see when it differs from the one ``recipe.yaml`` holds (callable
    rewards); ``prepare(run)``: called once the run directory exists, before training;
    ``announce``: name the run directory on stderr. A run directory this call made is removed
    again when a ``UserError`` stops the run before it logged or saved anything."""
    from rlhf.preflight import preflight
    from rlhf.trainers import get_trainer

    given = cfg if given is None else given
    if resume:  # a run directory may come from elsewhere: name the code it makes us import, first
        from rlhf.run import announce_code

        announce_code(given, f"resuming {run_dir}")
    preflight(given)  # model files, data, env: checked before a run directory is touched
    fresh = not resume and _new_dir(cfg, run_dir)
    # (before the trainer's heavy imports: a locked run directory is refused at once)
    run = _open_run(cfg, recipe, run_dir, resume)
    if announce and run.main:
        print(f"run directory: {run.dir}", file=sys.stderr)
    try:
        if prepare is not None:
            prepare(run)
        summary = get_trainer(cfg)(given, run, progress=progress, resume=resume)
        if getattr(cfg, "push_to_hub", None) and run.main:
            from rlhf.hub import push_adapter

            summary["hub"] = push_adapter(run.dir, cfg.push_to_hub, cfg.hub_private)
    except UserError:
        if fresh and run.main:
            _remove_unstarted(run)
        raise
    finally:
        run.close()  # the run directory's lock
    return run, summary


def evaluate(run, problems: int | None = None, rewards=None, progress: bool = False, episodes: int = 20) -> dict:
    """``rlhf eval`` of a run directory or a ``TrainResult``: LM runs, the base model vs the trained
    adapter on ``problems`` held-out prompts (default: the recipe's ``eval_problems``), scored by
    the run's rewards or ``rewards``; reward-model runs, pairwise accuracy; gym runs, ``episodes``."""
    from rlhf.config import load_run_config
    from rlhf.trainers import get_evaluator

    run_dir = str(run.run_dir if isinstance(run, TrainResult) else run)
    rewards = _as_list(rewards)
    if rewards is None and isinstance(run, TrainResult):
        rewards = run.rewards
    cfg = load_run_config(run_dir)
    if rewards is not None:
        if not hasattr(cfg, "rewards"):
            raise UserError(f"rewards= applies to language-model runs; {run_dir!r} is a gym run")
        cfg = dataclasses.replace(cfg, rewards=rewards)
    from rlhf.run import announce_code

    announce_code(cfg, f"evaluating {run_dir}")
    args = SimpleNamespace(problems=problems, episodes=episodes, no_progress=not progress)
    return get_evaluator(cfg)(run_dir, cfg, args)


def _new_dir(cfg, run_dir) -> bool:
    """Whether ``Run`` will create its directory: a named one that does not exist yet, or one
    it names itself (``Run`` picks a fresh name then)."""
    target = run_dir or (cfg.run_name and Path(cfg.out_dir) / cfg.run_name)
    return not target or not Path(target).exists()


def _remove_unstarted(run) -> None:
    """A run this call created that stopped before logging a step or saving anything leaves no
    directory behind (nothing in it was trained)."""
    if not any((run.dir / name).exists() for name in (run.metrics_path.name, "checkpoint", "adapter")):
        shutil.rmtree(run.dir, ignore_errors=True)


def _world() -> int:
    """Number of processes of this run (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _open_run(cfg, recipe, run_dir, resume: bool):
    """The run directory: with several processes (``accelerate launch`` / torchrun set
    WORLD_SIZE), the main process creates it and the others learn its name from it."""
    from rlhf.run import Run

    if _world() == 1:
        return Run(cfg, recipe, run_dir, resume=resume)
    from accelerate.utils import broadcast_object_list

    from rlhf.distributed import partial_state

    if not hasattr(cfg, "model") or cfg.algo not in ("grpo", "rloo", "reinforce", "ppo"):  # gym's ppo: one
        raise UserError(f"algo {cfg.algo!r} runs in one process; launch it without accelerate (the LM "
                        "RL algorithms grpo, rloo, reinforce and ppo run on several)")
    state = partial_state()
    box: list = [None]
    if state.is_main_process:
        try:
            run = Run(cfg, recipe, run_dir, resume=resume)
            box = [str(run.dir)]
        except UserError as exc:
            box = [exc]
    broadcast_object_list(box)
    if isinstance(box[0], UserError):
        raise box[0]
    return run if state.is_main_process else Run(cfg, recipe, box[0], resume=resume, main=False)


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
