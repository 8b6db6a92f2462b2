"""Share a trained LM run's adapter on the Hugging Face Hub.

    push_to_hub: you/arith-grpo        # in a recipe: pushed when the run ends
    rlhf push RUN_DIR you/arith-grpo   # any finished run, any time (--private for a new private repo)

``RUN_DIR/adapter/`` (the PEFT adapter, its tokenizer and chat template, the model card) is
uploaded to the model repo, created first when it does not exist (``HfApi.create_repo``,
``HfApi.upload_folder``). The token is huggingface_hub's own: ``HF_TOKEN`` or ``hf auth login``.
A failed push is one sentence; the run directory is never touched by it.
"""
from __future__ import annotations

from pathlib import Path

from rlhf.errors import UserError

ADAPTER = "adapter"


def check_repo_id(repo_id: str, key: str = "push_to_hub") -> None:
    """A Hub model repo id (``name`` or ``user/name``) or one sentence naming ``key``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{key} {repo_id!r} is not a Hub repo id ({str(exc).splitlines()[0]}); give "
                        "user/name, e.g. you/arith-grpo") from None


def push_adapter(run_dir, repo_id: str, private: bool = False, api=None) -> dict:
    """Upload ``RUN_DIR/adapter/`` to the Hub model repo ``repo_id``; returns its url and commit."""
    run_dir = Path(run_dir)
    adapter = run_dir / ADAPTER
    if not any((adapter / name).is_file() for name in ("adapter_config.json", "config.json")):  # (lora_r 0: a model)
        raise UserError(f"{str(run_dir)!r} has no trained adapter ({ADAPTER}/adapter_config.json) to push; "
                        "pass the run_dir of a finished LM run")
    check_repo_id(repo_id, "repo id")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:  # only the Hub's two calls: whatever they raise (HTTP, auth, offline, network) is one sentence
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(adapter.resolve()),
                                   commit_message=f"rlhf: adapter of run {run_dir.name}")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"pushing {adapter} to the Hub repo {repo_id!r} failed ({type(exc).__name__}: {reason}); "
                        f"the run is kept: check HF_TOKEN (or hf auth login) and the network, then "
                        f"rlhf push {run_dir} {repo_id}") from None
    return {"repo": repo_id, "url": str(url), "commit": getattr(commit, "oid", None)}
