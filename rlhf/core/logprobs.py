"""Log-probabilities of chosen actions without keeping a full log-softmax around."""
from __future__ import annotations

import torch
from torch import Tensor


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits)[..., index]`` for logits [..., V] and index [...].

    Computes ``logit[index] - logsumexp(logits)`` row by row, so peak memory stays at one
    [..., V] logits tensor instead of logits plus a same-sized log-softmax.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
