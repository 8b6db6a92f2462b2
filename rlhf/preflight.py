"""Checks of what a run depends on, made before a model loads or a run directory is written
(``preflight``, called by the CLI): the optional packages it imports (``check_packages``:
trackers, the env's simulator, the rewards' packages), the model directory (``check_model_dir``: ``config.json``,
safetensors weights -- the project loads no pickles --, every shard an index names, tokenizer
files) and the data (``check_rows``: non-empty, prompts are text or chat messages, the columns
each reward names in its signature (a reward without ``**kwargs`` gets only those), and
every prompt plus ``max_new_tokens`` within the model's context window). Numeric ranges of the
recipe keys are ``rlhf.validation``'s. Rows are counted from 1 in messages (row 1: the first
data row of a file).

Lives apart from ``rlhf.validation`` because it reads rewards, tasks and models, and the
config (which ``rlhf.validation`` serves) sits below those.
"""
from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

from rlhf.errors import UserError
from rlhf.extras import env_packages, require
from rlhf.reward_loading import GIVEN, load_reward, parse_reward_specs, reward_label
from rlhf.tracking import tracker_names

# ------------------------------------------------------------------------------ the preflight
def preflight(cfg) -> None:
    """Everything a run depends on that can be checked before a model loads."""
    check_packages(cfg)
    if type(cfg).__name__ == "GymConfig":
        from rlhf.gym.common import env_spec
        from rlhf.gym.resume import check_saveable

        env_spec(cfg)  # the env exists here and suits the algorithm
        check_saveable(cfg)  # save_every can checkpoint it
        return
    if type(cfg).__name__ == "AgentConfig":
        check_agent(cfg)
        return
    if cfg.algo == "reward_model":  # preference pairs: generated for arith, else the file's
        completion_keys = ("chosen", "rejected")
        needed = {k: "it needs prompt, chosen and rejected" for k in completion_keys}
    else:
        needed, completion_keys = reward_columns(cfg.rewards), ()
    sources = _row_sources(cfg)
    for source, rows in sources:
        check_rows(rows, source, needed, texts=("prompt", *completion_keys))
    model_dir = local_model(cfg.model)
    if model_dir is not None:
        check_model_dir(model_dir, cfg.model)
        check_lengths(cfg, model_dir, sources, completion_keys)


def check_packages(cfg) -> None:
    """Every optional package the run will import is installed: its trackers', its env's
    simulator, its rewards' (``fn.requires``); else one sentence with the pip line that brings it."""
    tracker_names(cfg.report_to, installed=True)
    if type(cfg).__name__ == "GymConfig":
        require(env_packages(cfg.env), f"env {cfg.env!r}")
        return
    if cfg.algo == "reward_model":  # scores nothing with cfg.rewards
        return
    for spec, _ in parse_reward_specs(cfg.rewards):
        if isinstance(spec, str) and spec.startswith("rm:"):  # torch and transformers: base dependencies
            from rlhf.lm.classifier_reward import check_reward_model  # (torch: LM recipes load it anyway)

            check_reward_model(spec[3:])  # a reward model of ours not trained yet: before the run directory
            continue
        fn = load_reward(spec) if isinstance(spec, str) else spec
        require(getattr(fn, "requires", ()), f"reward {reward_label(spec)!r}")


def check_agent(cfg) -> None:
    """An agent recipe: its environment loads and resets to a text observation, its rewards read
    only the columns an episode has, its model directory is whole."""
    from rlhf.agents.env_loading import env_factory
    from rlhf.agents.episodes import EPISODE_COLUMNS, first_messages

    first_messages(env_factory(cfg.env, cfg.env_kwargs)(), 0, None)
    missing = {c: why for c, why in reward_columns(cfg.rewards).items() if c not in EPISODE_COLUMNS}
    if missing:
        raise UserError(f"an episode has the columns {', '.join(EPISODE_COLUMNS)}, not {', '.join(missing)} "
                        f"({'; '.join(sorted(set(missing.values())))})")
    model_dir = local_model(cfg.model)
    if model_dir is not None:
        check_model_dir(model_dir, cfg.model)


def local_model(name: str) -> str | None:
    """The model's directory when it is here already (a local path or the cache), else None:
    a model still to be downloaded is fetched by the trainer as before, so a bad input never
    waits on a download (its files and the prompt lengths then go unchecked on that first run;
    ``rlhf model pull`` first to have them checked)."""
    from rlhf.lm.models import looks_local, resolve_model

    if looks_local(name):
        return resolve_model(name)  # an existing directory, or one sentence that it does not exist
    try:
        return resolve_model(name, download=False)
    except UserError:
        return None


def _row_sources(cfg) -> list[tuple[str, list[dict]]]:
    """(what to call it in a message, its rows) for every dataset the run reads; a task's rows
    as the run will see them (its column mapping, template and chat settings applied), in the
    dataset's own order."""
    from rlhf.tasks import (ArithTask, RowFormat, arith_row, held_out_source, load_dataset_source,
                            load_rows)

    if cfg.task != "arith" and cfg.algo == "reward_model":
        out = [(f"preference file {cfg.task!r}", load_rows(cfg.task))]
        if cfg.eval_task:
            out.append((f"eval_task file {cfg.eval_task!r}", load_rows(cfg.eval_task)))
        return out
    if cfg.task != "arith":
        fmt = RowFormat(cfg.columns, cfg.prompt_template, cfg.system_prompt, cfg.chat)
        sources = [("task file" if Path(cfg.task).is_file() else "task", cfg.task, cfg.task_split)]
        held = held_out_source(cfg.task, cfg.task_split, cfg.eval_task, cfg.eval_split)
        if held is not None:  # the held-out rows FileTask will read
            sources.append(("eval_task file" if cfg.eval_task else "task", *held))
        out = []
        for kind, source, split in sources:
            data = load_dataset_source(source, cfg.task_config, split)
            fmt.check(data, source)
            out.append((f"{kind} {source!r}", [fmt(row) for row in data]))
        return out
    if cfg.algo == "reward_model":  # pairs made by our code from the same template: nothing to check
        return []
    n = cfg.steps * cfg.prompts_per_step
    if n + cfg.eval_problems >= 90 * 90:  # a long run shows (nearly) every prompt: check all 8,100
        return [("task 'arith'", [arith_row(a, b) for a in range(10, 100) for b in range(10, 100)])]
    task = ArithTask(cfg.seed, n)  # the prompts this run will show
    return [("task 'arith'", list(itertools.islice(task.train_rows(), n))
             + task.held_out(cfg.eval_problems, cfg.eval_seed))]


# ------------------------------------------------------------------------------ 2. the model
# alternatives: one of these sets of files is a tokenizer transformers can load
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",), ("vocab.json", "merges.txt"),
                   ("vocab.txt",))
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_model_dir(path: str, name: str | None = None) -> None:
    """``path`` holds config.json, every safetensors weight file it needs, and a tokenizer."""
    d, label = Path(path), repr(name or path)
    where = f"model {label}" + (f" (directory {str(d)!r})" if name and str(name) != str(path) else "")
    if not (d / "config.json").is_file():
        raise UserError(f"{where} has no config.json; point model: at a Hugging Face checkpoint "
                        "directory (one written by save_pretrained)")
    for index in d.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{where}: {index.name} is not a valid shard index ({exc}); save the "
                            "model again with save_pretrained") from exc
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise UserError(f"{where} lacks weight shards {missing} named in {index.name}; copy the "
                            "complete checkpoint")
    if not any(d.glob("*.safetensors")):
        pickles = sorted(p.name for g in PICKLE_WEIGHTS for p in d.glob(g))
        if pickles:
            raise UserError(f"{where} has weights only as pickle files {pickles}; rlhf loads safetensors "
                            "only (loading them runs no code): convert with "
                            "model.save_pretrained(DIR, safe_serialization=True)")
        raise UserError(f"{where} has no weights (no *.safetensors file); copy the complete checkpoint "
                        "or save it with model.save_pretrained(DIR)")
    if not any(all((d / f).is_file() for f in files) for files in TOKENIZER_FILES):
        wanted = " or ".join(" + ".join(files) for files in TOKENIZER_FILES)
        raise UserError(f"{where} has no tokenizer files ({wanted}); save the tokenizer there with "
                        "tokenizer.save_pretrained(DIR)")


def context_window(model_dir: str) -> tuple[int | None, str]:
    """The model's maximum number of positions and the config key it came from (None: unknown)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for scope in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            if isinstance(scope.get(key), int):
                return scope[key], key
    return None, ""


# ------------------------------------------------------------------------------- 3. the data
def reward_columns(specs) -> dict[str, str]:
    """Column -> which reward needs it: each named parameter without a default (names or
    callables, as ``rlhf.reward_loading.parse_reward_specs`` takes them)."""
    needed = {}
    for spec, _ in parse_reward_specs(specs):
        if isinstance(spec, str) and spec.startswith("rm:"):  # (prompts, completions, **_); checked on load
            continue
        name = reward_label(spec)
        try:
            params = list(inspect.signature(load_reward(spec) if isinstance(spec, str) else spec).parameters.values())
        except (TypeError, ValueError):  # no signature to read (a C function): checked when called
            continue
        for p in params:
            if p.kind is p.POSITIONAL_ONLY:
                raise UserError(f"reward {name!r} has positional-only parameter {p.name!r}; rewards are "
                                "called with keywords (prompts=, completions=, one per dataset column)")
            if p.name not in GIVEN and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                needed.setdefault(p.name, f"reward {name!r} has them as parameters without a default")
    return needed


def check_rows(rows: list[dict], source: str, needed: dict[str, str], texts=("prompt",)) -> None:
    """Non-empty; the columns ``needed`` (column -> a clause saying who needs it) present; in every
    row, each column of ``texts`` non-empty text or chat messages."""
    if not rows:
        raise UserError(f"{source} has no rows; it needs at least one row with a 'prompt'")
    columns = set(rows[0])  # datasets gives every row the same columns
    missing = sorted(c for c in needed if c not in columns)
    if missing:
        why = "; ".join(dict.fromkeys(needed[c] for c in missing))
        raise UserError(f"{source} lacks columns {missing}; {why}; its columns are {sorted(columns)}")
    for i, row in enumerate(rows):
        for column in texts:
            _check_text(row.get(column), column, i, source)


def _check_text(value, column: str, i: int, source: str) -> None:
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return
    raise UserError(f"row {i + 1} of {source} has {column} {_short(value)}; it must be non-empty text or a "
                    "list of messages {'role': ..., 'content': ...}")


def check_lengths(cfg, model_dir: str, sources, completion_keys: tuple = ()) -> None:
    """Every prompt (plus ``max_new_tokens``, or plus its longest ``completion_keys`` column for
    preference pairs) fits the context window; a prompt longer than ``max_prompt_length`` (where
    set: > 0) counts as that long, since the run keeps only its last ``max_prompt_length`` tokens."""
    window, window_key = context_window(model_dir)
    cap = getattr(cfg, "max_prompt_length", 0) or None
    if window is None:
        return
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    for source, rows in sources:
        prompt_len = _token_counts(tok, [_render(tok, r["prompt"], i, source) for i, r in enumerate(rows)])
        if completion_keys:  # preference pairs: the longer of the two completions follows the prompt
            from rewards import completion_text

            extra = [max(c) for c in zip(*(_token_counts(tok, [completion_text(r[k]) for r in rows])
                                           for k in completion_keys))]
            what = "its longest completion"
        else:
            extra, what = [cfg.max_new_tokens] * len(rows), f"max_new_tokens={cfg.max_new_tokens}"
        for i, (n, m) in enumerate(zip(prompt_len, extra)):
            n = n if cap is None or completion_keys else min(n, cap)  # left-truncated to max_prompt_length
            if n + m > window:
                raise UserError(f"row {i + 1} of {source} has a prompt of {n} tokens; with {what} it needs "
                                f"{n + m} positions but model {cfg.model!r} has {window} ({window_key}); "
                                "shorten or drop the long prompts, or lower max_new_tokens")


def _token_counts(tok, texts: list[str]) -> list[int]:
    """Tokens of each text (each distinct text tokenised once, in one batch)."""
    unique = list(dict.fromkeys(texts))
    counts = dict(zip(unique, map(len, tok(unique, add_special_tokens=False).input_ids))) if unique else {}
    return [counts[t] for t in texts]


def _render(tok, prompt, i: int, source: str) -> str:
    """The prompt as the policy sees it (``LMPolicy.apply_template``)."""
    if isinstance(prompt, str):
        return prompt
    if tok.chat_template is None:
        raise UserError(f"{source} has conversational prompts but the model's tokenizer has no chat "
                        "template; use plain-text prompts or a model with a chat template")
    try:
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the user's template or messages: name the row, not the jinja frame
        raise UserError(f"row {i + 1} of {source}: the chat template failed on its prompt "
                        f"({type(exc).__name__}: {exc}); fix the messages or the template") from exc


def _short(value) -> str:
    text = repr(value)
    return text[:60] + "..." if len(text) > 60 else text
