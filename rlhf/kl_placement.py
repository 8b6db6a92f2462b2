"""Which KL estimator goes where: the default of each placement and the pairs that are refused.

On-policy, with r = ref/pi: k1 in the loss has zero expected gradient; k2 in the loss descends
KL(pi||ref); k3 in the loss descends KL(ref||pi) (the GRPO paper's form); k3+ (ratio-weighted
k3, TRL's ``use_bias_correction_kl``) in the loss descends KL(pi||ref); in the reward (a score
function) only k1 is unbiased, and k3 there nearly vanishes near the reference. The expected
gradient of every accepted pair is checked against brute force in tests/test_kl_grad.py.
Read by ``LMConfig`` (rlhf/config.py), which fills the default and refuses the pairs below.
"""
from __future__ import annotations

# Default KL estimator of each placement. In the loss, k3+: on-policy its per-sample gradient is
# k2's, log(pi/ref) * grad log pi, so both descend KL(pi||ref) with the same variance; after the
# first of several minibatches (samples from pi_old) its importance ratio keeps the expected
# gradient exact where k2's drifts, and its logged value stays an unbiased KL(pi||ref) where k2's
# is biased (tests/test_kl_grad.py).
DEFAULT_KL_ESTIMATOR = {"loss": "k3+", "reward": "k1"}

# (estimator, placement) pairs whose expected gradient has no correct meaning, and the fix
KL_REFUSED = {
    ("k1", "loss"): "k1 in the loss has zero expected gradient (E_pi[grad log pi] = 0), so it adds "
                    "noise and no pull toward the reference; use k3+ or k2 in the loss, or k1 with "
                    "kl_placement: reward",
    ("k2", "reward"): "k2 in the reward is a biased penalty whose score-function gradient descends "
                      "neither KL direction; use k1 in the reward (InstructGPT), or k2 / k3+ with "
                      "kl_placement: loss",
    ("k3", "reward"): "k3 in the reward has almost no gradient (it descends KL(pi||ref) - KL(ref||pi), "
                      "~0 near the reference); use k1 in the reward (InstructGPT), or k3+ with "
                      "kl_placement: loss",
    ("k3+", "reward"): "k3+ is a loss-side correction (its ratio weight is 1 in a reward, which leaves "
                       "k3, with almost no gradient); use k1 in the reward (InstructGPT), or k3+ with "
                       "kl_placement: loss",
}
