"""Old recipe keys and the keys that replaced them, per family: they still load (recipes,
``--set``, the ``recipe.yaml`` of older runs), each with one logged line naming the new key.

A concept both families have has one name in both, chosen for what a TRL / CleanRL / SB3 user
already knows. An old name maps to its own family's concept, never to a different concept of
the same name:

    concept                               name              old names (family)
    clip epsilon of the ratio (below 1)   clip_range        clip_low (LM); gym already clip_range
    clip epsilon above 1 (DAPO)           clip_range_high   clip_high (LM)
    value clipping epsilon                clip_range_value  value_clip (LM), clip_vloss (gym)
    GAE lambda                            gae_lambda        lam (LM)
    advantage whitening                   norm_adv          whiten_advantages (LM)
    minibatches per epoch (a count)       minibatches       minibatch_size (gym, a size: converted
                                                            to n_steps * n_envs / size, refused if
                                                            that is not a whole number)
    PPO-paper KL penalty beta             penalty_coef      kl_coef (gym)
    KL(pi || ref) coefficient             kl_coef           beta (LM, algos other than reward_model;
                                                            TRL's name too)
    reward-model log-ratio scale          rm_beta           beta (LM, algo reward_model)

``minibatches`` is a count because an LM minibatch holds whole groups; a gym minibatch holds
n_steps * n_envs / minibatches rows, which is the old ``minibatch_size`` exactly whenever that
divided the batch (every shipped recipe). Names from other toolkits that are not old names of
ours live in rlhf/toolkit_names.py (hints only; they do not load).
"""
from __future__ import annotations

import logging

from rlhf.gym.config import minibatches_from_size

log = logging.getLogger(__name__)

_TRL_BETA = "; beta is TRL's name for it"


def _beta(value, values: dict) -> tuple:
    """beta was the KL(pi || ref) coefficient (TRL's beta), and a reward model's log-ratio scale."""
    if values.get("algo") == "reward_model":
        return "rm_beta", value, ""
    return "kl_coef", value, _TRL_BETA


# old recipe key -> its new key, per family (the table above); (new key, note) adds a note to the
# hint. A function maps an old key whose new key or value depends on the recipe:
# (old value, recipe values) -> (new key, new value, note).
RENAMED: dict[str, dict] = {
    "LMConfig": {
        "clip_low": "clip_range", "clip_high": "clip_range_high", "value_clip": "clip_range_value",
        "lam": "gae_lambda", "whiten_advantages": "norm_adv", "beta": _beta,
    },
    "GymConfig": {
        "clip_vloss": "clip_range_value",
        "kl_coef": ("penalty_coef", "; kl_coef was the PPO-paper penalty here, and names the KL-to-reference "
                    "coefficient of LM recipes"),
        "minibatch_size": lambda v, values: ("minibatches", minibatches_from_size(v, values), "converted"),
    },
}

RENAMED["AgentConfig"] = RENAMED["LMConfig"]  # an agent recipe is an LM recipe


def rename_deprecated(cls, values: dict) -> dict:
    """``values`` with each old key of ``cls``'s family replaced by its new key, one logged line
    per old key; of an old key and its new key both given, the later one counts."""
    renamed = RENAMED.get(cls.__name__, {})
    out = {}
    for key, value in values.items():
        if key not in renamed:
            out[key] = value
            continue
        rule = renamed[key]
        if callable(rule):
            new, new_value, note = rule(value, values)
        else:
            (new, note), new_value = (rule, "") if isinstance(rule, str) else rule, value
        if new in values:  # the later one wins, as a repeated --set does (an override comes after the file)
            order = list(values)
            later = key if order.index(key) > order.index(new) else new
            log.warning(f"recipe keys {key!r} and {new!r} are the same setting ({key!r} is its old name); "
                        f"the later, {later!r}, is used")
            if later == new:
                continue
        same = f": {new}={new_value!r} makes the same minibatches here" if note == "converted" else \
            f", the same setting{note}"
        log.warning(f"recipe key {key!r} is deprecated: use {new!r}{same}")
        out[new] = new_value
    return out
