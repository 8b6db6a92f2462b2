"""Where a run's numbers go besides ``metrics.jsonl``: experiment trackers, sample completions,
and the run's report page at the end.

    report_to: [tensorboard, wandb]   # or one name; none (the default): metrics.jsonl only
    log_completions_every: 10         # LM: completions.jsonl every N steps, the first and last too

Trackers go through accelerate's own tracking (``Accelerator(log_with=...)``, ``init_trackers``,
``log``): the LM trainer's ``Accelerator`` carries them (``accelerator_kwargs``); a gym run,
which has none, gets one only when it asks for a tracker. Where each one writes:

    tensorboard   RUN_DIR/tensorboard/rlhf/     tensorboard --logdir RUN_DIR/tensorboard
    wandb         project "rlhf", run named after RUN_DIR, files in RUN_DIR/wandb (WANDB_MODE=offline works)
    trackio       project "rlhf", run named after RUN_DIR
    mlflow        experiment "rlhf" (MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_URI as usual)

Every row ``Run.log`` writes reaches the trackers at its ``step`` (``Run.trackers``). Sample
completions (prompt, completion, each reward's value, advantage, length, truncated) go to
``RUN_DIR/completions.jsonl``, to a W&B table and to TensorBoard's text tab. Only the main
process writes (with several processes: the main process's share of the batch).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from rlhf.errors import UserError

# tracker name -> (module imported to use it, pip package)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}
PROJECT = "rlhf"  # the tracker-side project / experiment name of every run
COMPLETIONS = "completions.jsonl"
SHOWN_AT_END = 3  # sample completions printed at the end of a run with a progress bar


def tracker_names(report_to, installed: bool = False) -> list[str]:
    """``report_to`` (one name, a list of them, or none) as a list of tracker names; an unknown
    name, and with ``installed`` a tracker whose package is missing, is one sentence."""
    items = [] if report_to is None else [report_to] if isinstance(report_to, str) else list(report_to)
    names: list[str] = []
    for item in items:
        name = item.strip().lower() if isinstance(item, str) else None
        if name in ("none", ""):
            continue
        if name not in TRACKERS:
            raise UserError(f"report_to: unknown tracker {item!r}; valid: {', '.join(TRACKERS)} or none "
                            "(e.g. report_to: [tensorboard, wandb])")
        module, package = TRACKERS[name]
        if installed and importlib.util.find_spec(module) is None:
            raise UserError(f"report_to: {name} is not installed here; pip install {package} (or pip "
                            f"install 'rlhf[track]'), or remove {name} from report_to")
        if name not in names:
            names.append(name)
    return names


def accelerator_kwargs(cfg, run_dir) -> dict:
    """What an ``Accelerator`` needs to carry ``cfg.report_to``'s trackers ({} for none)."""
    names = tracker_names(getattr(cfg, "report_to", None), installed=True)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names, "project_config": ProjectConfiguration(
        project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tensorboard"))}


class Tracking:
    """One run's trackers, completions log and end-of-run report. ``accelerator``: the trainer's
    own (built with ``accelerator_kwargs``); None: one is made here if a tracker is asked for."""

    def __init__(self, cfg, run, accelerator=None, progress: bool = True):
        self.cfg, self.run, self.progress = cfg, run, progress and run.main
        self.names = tracker_names(getattr(cfg, "report_to", None), installed=True)
        self.every = getattr(cfg, "log_completions_every", 0)
        self.last_samples: list[dict] = []
        self.acc = None
        if self.names:
            self.acc = accelerator if accelerator is not None else _tracking_accelerator(cfg, run.dir)
            self.acc.init_trackers(PROJECT, config=_flat_config(cfg), init_kwargs=_init_kwargs(self.names, run.dir))
        run.trackers = self

    def log(self, row: dict) -> None:
        """A metrics row (as written to metrics.jsonl) to every tracker, at its ``step``."""
        if self.acc is None:
            return
        values = {k: v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.acc.log(values, step=int(row["step"]))

    def due(self, step: int) -> bool:
        """Whether ``step`` (counted from 1) logs its completions: every ``log_completions_every``
        steps, the first and the last (0 turns it off)."""
        return self.every > 0 and (step == 1 or step % self.every == 0 or step == self.cfg.steps)

    def completions(self, step: int, prompts: list, completions: list, rewards: list, reward_values: dict,
                    adv, roll) -> None:
        """This process's samples of ``step``, when due: one line each in completions.jsonl.
        ``rewards`` [N]: the weighted total; ``reward_values``: each function's own values (None:
        unscored); ``adv``: [N] or per token [N, C] (ppo: its mean over the completion's tokens)."""
        if not self.run.main or not self.due(step):
            return
        rows = sample_rows(step, prompts, completions, rewards, reward_values, adv, roll)
        self.last_samples = rows
        self.run.append(COMPLETIONS, rows)
        if self.acc is not None:
            self._table(step, rows)

    def _table(self, step: int, rows: list[dict]) -> None:
        """The samples as a table where a tracker has one: a W&B Table, TensorBoard text (markdown)."""
        columns = ["step", "prompt", "completion", "reward", *rows[0]["rewards"], "advantage", "length", "truncated"]
        data = [[r["step"], r["prompt"], r["completion"], r["reward"], *r["rewards"].values(), r["advantage"],
                 r["length"], r["truncated"]] for r in rows]
        if "wandb" in self.names:
            self.acc.get_tracker("wandb").log_table("completions", columns=columns, data=data, step=step)
        if "tensorboard" in self.names:
            self.acc.get_tracker("tensorboard").log({"completions": markdown_table(columns, data)}, step=step)

    def finish(self, result: dict) -> dict:
        """End of the run: close the trackers, write report.html, show a few samples; ``result``
        (the run's JSON) gains the report's path."""
        if self.acc is not None:  # (not acc.end_training: it also ends the processes' group)
            for tracker in self.acc.trackers:
                tracker.finish()
        if not self.run.main:
            return result
        from rlhf.report import write_report

        result = {**result, "report": str(write_report(self.run.dir))}
        if self.progress:
            show_samples(distinct_prompts_first(self.last_samples, SHOWN_AT_END))
            print(f"report: {result['report']}", file=sys.stderr)
        return result


def distinct_prompts_first(rows: list[dict], k: int) -> list[dict]:
    """Up to ``k`` of ``rows``: one per prompt first (a step's rows come in groups of one prompt),
    then the rest in order, so the samples shown at the end are not one prompt's group."""
    seen, first, rest = set(), [], []
    for r in rows:
        key = str(r["prompt"])
        (rest if key in seen else first).append(r)
        seen.add(key)
    return (first + rest)[:k]


def sample_rows(step: int, prompts: list, completions: list, rewards, reward_values: dict, adv, roll) -> list[dict]:
    """One JSON-ready dict per sample of a step."""
    mask = roll.mask.float()
    lengths = mask.sum(1)
    adv = adv.detach().float()
    if adv.dim() == 2:  # per-token advantages (ppo): their mean over the completion's tokens
        adv = (adv * mask).sum(1) / lengths.clamp(min=1)
    rows = []
    for i, completion in enumerate(completions):
        rows.append({"step": step, "prompt": prompt_text(prompts[i]), "completion": prompt_text(completion),
                     "reward": round(float(rewards[i]), 6),
                     "rewards": {k: None if v[i] is None else round(float(v[i]), 6) for k, v in reward_values.items()},
                     "advantage": round(float(adv[i]), 6), "length": int(lengths[i]),
                     "truncated": bool(roll.truncated[i])})
    return rows


def prompt_text(x) -> str:
    """A prompt or completion as text: a string as it is, chat messages as ``role: content`` lines
    (a completion's single assistant message: its content)."""
    if isinstance(x, str):
        return x
    if len(x) == 1 and x[0].get("role") == "assistant":
        return str(x[0].get("content", ""))
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in x)


def markdown_table(columns: list[str], data: list[list]) -> str:
    """A markdown table (TensorBoard's text tab renders it); cells' pipes and newlines escaped."""
    def cell(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def show_samples(rows: list[dict], width: int = 160) -> None:
    """A few samples on stderr (the progress output), each cut to ``width`` characters."""
    if not rows:
        return
    print(f"sample completions (step {rows[0]['step']}):", file=sys.stderr)
    for r in rows:
        short = lambda t: " ".join(t.split())[:width]  # noqa: E731
        rewards = ", ".join(f"{k} {v:g}" if v is not None else f"{k} -" for k, v in r["rewards"].items())
        print(f"  prompt:     {short(r['prompt'])}\n  completion: {short(r['completion'])}\n"
              f"  reward {r['reward']:g} ({rewards}), advantage {r['advantage']:+.3f}, {r['length']} tokens"
              f"{', truncated' if r['truncated'] else ''}", file=sys.stderr)


def _tracking_accelerator(cfg, run_dir):
    """An ``Accelerator`` only to carry trackers (gym runs and the reward-model trainer have none)."""
    from accelerate import Accelerator

    from rlhf.distributed import use_cpu

    return Accelerator(cpu=use_cpu(), **accelerator_kwargs(cfg, run_dir))


def _init_kwargs(names: list[str], run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir)}, "trackio": {"name": run_dir.name},
              "mlflow": {"run_name": run_dir.name}}
    return {k: v for k, v in kwargs.items() if k in names}


def _flat_config(cfg) -> dict:
    """The recipe as hyperparameters: numbers, strings and booleans as they are, the rest as text
    (TensorBoard's hparams take nothing else)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in dataclasses.asdict(cfg).items()}
