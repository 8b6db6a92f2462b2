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


def logp_rounding_bound(policy, u: float) -> float:
    """A first-order bound on how far a log-prob computed with relative roundings of ``u`` is
    from the exact one, for the policy's model, from its weights.

    logp_y = z_y - logsumexp(z) moves by at most 2 max_j |dz_j| (logsumexp is 1-Lipschitz in
    the max norm). z_j = h . w_j with h the final RMSNorm's output, so |h| <= sqrt(d) max|g|
    (unit RMS times the norm's gain g) and, by Cauchy-Schwarz, |dz_j| <= K u |h| |w_j| when
    h and w_j carry relative errors summing to K u. K counts the roundings on the path from
    the embedding to a logit, each at most u relative: per decoder layer ~12 (the weights of
    q, k, v, o, gate, up, down and the stored activations), and 2 at the head (its weight and
    h). Well-conditioned layers (random init, a norm before every block) do not amplify them
    at first order. It holds on any CPU: it assumes only IEEE round-to-nearest. (bf16 storage:
    u = 2^-8; fp32 throughout, where summation order is what differs: u = n 2^-24, a length-n
    dot product's worst-case error, Higham's gamma_n.)
    """
    import math

    base = policy.model.get_base_model()
    layers = base.config.num_hidden_layers
    head = base.get_output_embeddings().weight.float()
    h_norm = math.sqrt(base.config.hidden_size) * float(base.model.norm.weight.float().abs().max())
    k = 12 * layers + 2
    return 2 * k * u * h_norm * float(head.norm(dim=1).max())


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
