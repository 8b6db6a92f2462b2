"""Shared fixtures. Tests never download: the LM is a 2-layer Llama built from a config, with
a byte-level BPE tokenizer trained here in milliseconds and a ChatML chat template."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf.testing import tiny_checkpoint  # noqa: E402


def make_tiny_checkpoint(path) -> str:
    return tiny_checkpoint(path)


def policy_with_adapter(model: str, **kw):
    """An LMPolicy (lora_r 4) whose LoRA B is drawn non-zero (N(0, 0.25), seed 1), so the adapter
    changes the outputs; the draws do not depend on the base's dtype (the adapter is fp32)."""
    import torch

    from rlhf.lm.policy import LMPolicy

    torch.manual_seed(0)
    policy = LMPolicy(model, lora_r=4, lora_alpha=8, **kw)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return policy


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def fake_hub_cache(hub_cache, hub_id: str, checkpoint, revision: str = "0" * 40) -> str:
    """Put the files of ``checkpoint`` into a Hugging Face Hub cache (``hub_cache``, i.e.
    ``$HF_HOME/hub``) as if ``hub_id`` had been downloaded at commit ``revision``: the layout
    huggingface_hub writes (``models--org--name/{blobs,snapshots/<rev>,refs/main}``, snapshot
    files linking to blobs), named by its own helpers. Returns the snapshot directory."""
    import hashlib
    import shutil
    from pathlib import Path

    from huggingface_hub.file_download import repo_folder_name

    repo = Path(hub_cache) / repo_folder_name(repo_id=hub_id, repo_type="model")
    snapshot, blobs = repo / "snapshots" / revision, repo / "blobs"
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(checkpoint).iterdir()):
        if f.is_file():
            blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return str(snapshot)
