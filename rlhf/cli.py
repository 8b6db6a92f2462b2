"""Command line: ``rlhf train RECIPE``, ``rlhf eval RUN_DIR``, ``rlhf model pull [NAME]``;
``rlhf generate|chat|merge|push RUN_DIR`` use a trained adapter; ``rlhf report RUN_DIR`` writes
its report page; ``rlhf recipes``, ``rlhf keys [ALGO]``.

What the commands do is the Python API's (``rlhf/api.py``: ``run_recipe``, ``evaluate``,
``Policy``); here are the flags, the output and the exit status. Every command prints, as its
very last line on stdout, one JSON object with its results.
Mistakes a user can make end in one sentence on stderr and exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description="RL fine-tuning of language models and gym agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train from a YAML recipe")
    tr.add_argument("recipe", nargs="?", help="an installed recipe's name (rlhf recipes lists them, e.g. "
                    "grpo_arith) or a recipe file's path")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (repeatable)")
    tr.add_argument("--run-dir", help="write the run here instead of out_dir/<recipe>-<time>")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.epilog = "every recipe key with its default and meaning: rlhf keys [ALGO]"
    ev = sub.add_parser("eval", help="evaluate a run directory on held-out problems")
    ev.add_argument("run_dir")
    ev.add_argument("--problems", type=int, help="LM: number of held-out prompts (default: the recipe's)")
    ev.add_argument("--episodes", type=int, default=20, help="gym: deterministic episodes on fresh seeds")
    ev.add_argument("--no-progress", action="store_true")
    mp = sub.add_parser("model", help="manage cached models")
    mp.add_argument("action", choices=["pull"])
    mp.add_argument("name", nargs="?", default=None, help="alias or Hub id (default: SmolLM2-135M-Instruct)")
    mp.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    _share_parsers(sub)
    args = parser.parse_args(argv)
    _quiet()
    from rlhf.errors import UserError

    try:
        result = COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the adapter written so far is kept in the run directory", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # one result line, from the main process
        print(json.dumps(result))
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """End a process of several (torch.distributed) once every rank finished its command: a
    barrier, ``destroy_process_group``, then the process exits at once with status 0, its output
    flushed and every run file already closed. Left to the interpreter's finalisation, objects
    still holding gloo work (FSDP2's, the process group's own threads) can abort a finished run
    ("terminate called without an active exception", SIGABRT: pytorch #190489, #179291); the
    barrier and destroy alone did not stop it (CI, FSDP2 resume). Not after an error: a rank
    still in a collective would leave the barrier waiting. (A light command never imported torch.)"""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _train(args) -> dict:
    from rlhf.api import run_recipe
    from rlhf.config import load_recipe
    from rlhf.errors import UserError

    if args.resume:
        if args.recipe or args.run_dir:
            raise UserError("--resume RUN_DIR takes the recipe and run directory from RUN_DIR; "
                            "drop the recipe argument and --run-dir")
        recipe = Path(args.resume) / "recipe.yaml"
        if not recipe.is_file():
            raise UserError(f"{args.resume!r} is not a run directory (no recipe.yaml) to resume")
        cfg = load_recipe(str(recipe), args.overrides)
        run_dir = args.resume
    elif args.recipe:
        from rlhf.catalog import find_recipe

        args.recipe = find_recipe(args.recipe)  # a bare name is an installed recipe
        cfg, run_dir = load_recipe(args.recipe, args.overrides), args.run_dir
    else:
        raise UserError("give a recipe (rlhf train recipes/grpo_arith.yaml) or --resume RUN_DIR")
    _, summary = run_recipe(cfg, args.recipe, run_dir, resume=bool(args.resume), progress=not args.no_progress,
                            announce=True)
    return summary


def _eval(args) -> dict:
    from rlhf.api import evaluate

    return evaluate(args.run_dir, args.problems, progress=not args.no_progress, episodes=args.episodes)


def _model(args) -> dict:
    from rlhf.lm.models import DEFAULT_MODEL, pull_model

    name = args.name or DEFAULT_MODEL
    return {"model": name, "path": pull_model(name, args.revision)}


def _share_parsers(sub) -> None:
    """The subcommands that use a trained adapter, and the ones that list what ships."""
    for name, help_ in (("generate", "answer one prompt with a run's trained adapter"),
                        ("chat", "talk to a run's trained adapter: one message per stdin line, until EOF")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run_dir")
        if name == "generate":
            p.add_argument("prompt")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    mg = sub.add_parser("merge", help="fold a run's adapter into its base: a full safetensors checkpoint")
    mg.add_argument("run_dir")
    mg.add_argument("out_dir")
    pu = sub.add_parser("push", help="upload a run's adapter/ (with tokenizer and model card) to a Hub model repo")
    pu.add_argument("run_dir")
    pu.add_argument("repo_id", help="user/name (created if it does not exist)")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    rp = sub.add_parser("report", help="write a run's report page (RUN_DIR/report.html): curves and samples")
    rp.add_argument("run_dir")
    sub.add_parser("recipes", help="list the installed recipes (rlhf train NAME runs one)")
    ks = sub.add_parser("keys", help="every recipe key with its default and meaning")
    ks.add_argument("algo", nargs="?", help="only the config family of this algo")


def _generate(args) -> dict:
    from rlhf.api import Policy

    text = Policy(args.run_dir).generate(args.prompt, args.max_new_tokens, args.temperature)
    print(text)
    return {"prompt": args.prompt, "completion": text}


def _chat(args) -> dict:
    from rlhf.api import Policy

    policy = Policy(args.run_dir)
    policy.load()  # before the first message: a run without an adapter is refused at once
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        answer = policy.generate(messages, args.max_new_tokens, args.temperature)
        messages.append({"role": "assistant", "content": answer})
        print(answer if not interactive else f"model> {answer}", flush=True)
    return {"turns": len(messages) // 2}


def _merge(args) -> dict:
    from rlhf.lm.share import merge

    return {"merged": merge(args.run_dir, args.out_dir)}


def _push(args) -> dict:
    from rlhf.hub import push_adapter

    return push_adapter(args.run_dir, args.repo_id, args.private)


def _report(args) -> dict:
    from rlhf.report import write_report

    return {"report": str(write_report(args.run_dir))}


def _recipes(args) -> dict:
    from rlhf.catalog import list_recipes, recipes_dir

    found = list_recipes()
    width = max((len(name) for name, _ in found), default=0)
    for name, first in found:
        print(f"{name:<{width}}  {first}")
    return {"recipes": [name for name, _ in found], "dir": str(recipes_dir())}


def _keys(args) -> dict:
    from rlhf.catalog import config_keys, families

    count = 0
    for cls in families(args.algo):
        print(f"{cls.__name__}: algo {' | '.join(cls.choices['algo'])}")
        for key, default, doc in config_keys(cls):
            print(f"  {key:<22} {default!r:<24} {doc}")
            count += 1
    return {"keys": count}


def _version() -> str:
    from rlhf import __version__

    return __version__


COMMANDS = {"train": _train, "eval": _eval, "model": _model, "generate": _generate, "chat": _chat,
            "merge": _merge, "push": _push, "report": _report, "recipes": _recipes, "keys": _keys}


# libraries whose own warnings are chatter to a user of the CLI (deprecations inside them,
# generation-config notes); matched on the module a warning is attributed to
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "huggingface_hub", "gguf",
             "tokenizers", "safetensors", "deepspeed", "gymnasium", "matplotlib", "pandas", "pyarrow")


def _quiet() -> None:
    """Keep the terminal for our progress bar: silence library chatter below errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for lib in LIBRARIES:  # their chatter only: a warning raised by a user's reward code still shows
        warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rlhf").setLevel(logging.INFO)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
