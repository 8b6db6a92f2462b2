"""Numeric tests of value-learning targets and natural-gradient helpers, by hand."""
import math

import pytest
import torch

from rlhf.core.natural_gradient import backtracking_line_search, conjugate_gradient, max_step_scale
from rlhf.core.value_learning import (
    double_q_target,
    linear_schedule,
    q_learning_update,
    sac_actor_loss,
    soft_q_target,
    td_target,
    temperature_loss,
)

from numeric import close  # noqa: E402

T = torch.tensor



def test_td_target_by_hand():
    # row 0: 1 + 0.9 * max(2, 5) = 5.5; row 1 terminated: just r = -1
    y = td_target(T([1.0, -1.0]), T([[2.0, 5.0], [7.0, 3.0]]), T([0.0, 1.0]), 0.9)
    close(y, [5.5, -1.0])


def test_double_q_target_online_picks_target_evaluates():
    # online prefers action 0 in row 0 (3 > 1) -> target's Q(s', 0) = 2: y = 1 + 0.5 * 2 = 2
    # row 1: online prefers action 1 -> target 10: y = 0 + 0.5 * 10 = 5
    online = T([[3.0, 1.0], [0.0, 4.0]])
    target = T([[2.0, 9.0], [8.0, 10.0]])
    y = double_q_target(T([1.0, 0.0]), online, target, T([0.0, 0.0]), 0.5)
    close(y, [2.0, 5.0])
    # the plain target would take max of the target net instead: 1 + 0.5 * 9 = 5.5
    close(td_target(T([1.0, 0.0]), target, T([0.0, 0.0]), 0.5), [5.5, 5.0])


def test_soft_q_target_by_hand():
    # min(Q1', Q2') = 2, alpha * logp = 0.5 * -2 = -1 -> soft V = 3; y = 1 + 0.9 * 3 = 3.7
    y = soft_q_target(T([1.0, 1.0]), T([2.0, 2.0]), T([4.0, 4.0]), T([-2.0, -2.0]), T([0.0, 1.0]), 0.9, 0.5)
    close(y, [3.7, 1.0])


def test_sac_actor_and_temperature_losses():
    close(sac_actor_loss(T([-1.0]), T([3.0]), T([2.0]), 0.5), [-2.5])  # 0.5 * -1 - 2
    log_alpha = T([0.3], requires_grad=True)
    # entropy 1 (logp = -1) below target 2: d/dlog_alpha = -(logp + H) = -(-1 + 2) = -1 < 0,
    # so gradient descent raises alpha
    temperature_loss(log_alpha, T([-1.0]), 2.0).sum().backward()
    close(log_alpha.grad, [-1.0])


def test_q_learning_update_by_hand():
    # 0.5 + 0.1 * (1 + 0.9 * 2 - 0.5) = 0.73; terminal: 0.5 + 0.1 * (1 - 0.5) = 0.55
    assert q_learning_update(0.5, 1.0, 2.0, False, 0.9, 0.1) == pytest.approx(0.73)
    assert q_learning_update(0.5, 1.0, 2.0, True, 0.9, 0.1) == pytest.approx(0.55)


def test_linear_schedule():
    assert linear_schedule(1.0, 0.1, 0.5, 0.25) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 0.5, 0.9) == pytest.approx(0.1)


def test_conjugate_gradient_solves_spd_system():
    a = T([[4.0, 1.0], [1.0, 3.0]])
    b = T([1.0, 2.0])
    x = conjugate_gradient(lambda v: a @ v, b, iters=2)  # exact in 2 iterations for 2x2
    close(x, [1 / 11, 7 / 11])


def test_max_step_scale_hits_the_kl_radius():
    # s^T A s = 2 * 4 = 8 (A = 2I, s = [2, 0]): beta = sqrt(2 * 0.01 / 8) = 0.05
    s = T([2.0, 0.0])
    close(max_step_scale(s, 2 * s, 0.01), math.sqrt(0.02 / 8))


def test_backtracking_line_search_shrinks_until_kl_fits():
    # kl grows with step^2; improvement linear: step 1 (kl .04) and .5 (kl .01 > .005) fail, .25 fits
    full = T([1.0])
    step, k = backtracking_line_search(lambda s: (float(s), float(s) ** 2 * 0.04), full, 1.0, 0.005)
    assert k == 2 and float(step) == pytest.approx(0.25)
    none, k = backtracking_line_search(lambda s: (-1.0, 0.0), full, 1.0, 0.005, line_search_steps=3)
    assert none is None and k == 3
