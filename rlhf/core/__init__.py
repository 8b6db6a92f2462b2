"""Core math: pure functions, no model, optimiser or config inside."""
from rlhf.core.advantages import (
    discounted_cumsum,
    discounted_returns,
    explained_variance,
    gae,
    group_normalize,
    last_index,
    leave_one_out,
    whiten,
)
from rlhf.core.objectives import (
    AGG_MODES,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    adaptive_kl_coef,
    aggregate,
    bradley_terry_loss,
    clipped_surrogate,
    entropy_from_logits,
    kl_estimate,
    kl_penalty_surrogate,
    policy_loss,
    reinforce,
    value_loss,
)
from rlhf.core.logprobs import linear_logprobs, sample_categorical, selective_log_softmax
from rlhf.core.registry import (
    ADV_ESTIMATORS,
    POLICY_OBJECTIVES,
    AdvInput,
    Registry,
    register_adv_est,
    register_policy_loss,
)
from rlhf.core import estimators  # noqa: E402,F401  registers the built-in advantage estimators

__all__ = [
    "discounted_cumsum", "discounted_returns", "explained_variance", "gae", "group_normalize", "last_index",
    "leave_one_out",
    "whiten", "AGG_MODES", "KL_ESTIMATORS", "KL_PLACEMENTS", "aggregate", "clipped_surrogate",
    "entropy_from_logits", "kl_estimate", "kl_penalty_surrogate", "adaptive_kl_coef", "bradley_terry_loss",
    "policy_loss", "reinforce", "value_loss",
    "selective_log_softmax", "sample_categorical", "linear_logprobs",
    "ADV_ESTIMATORS", "POLICY_OBJECTIVES", "AdvInput", "Registry", "register_adv_est", "register_policy_loss",
]
