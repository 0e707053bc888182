"""CAMEL's consistency loss and (class-conditional) Group DRO against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from patchd.ml.losses import GroupDRO, consistency_loss, consistency_terms, kl_div

torch.set_num_threads(1)


def test_consistency_matches_hand_computation() -> None:
    p_x = torch.tensor([[0.8, 0.2]])
    p_f = torch.tensor([[0.6, 0.4]])
    p_g = torch.tensor([[0.2, 0.8]])
    # m = (p_F + p_G) / 2 = [0.4, 0.6]; KL(p || m) = sum p log(p / m), p first
    kl_x = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)
    kl_f = 0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6)
    kl_g = 0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6)
    expected = 0.5 * kl_x + 0.25 * kl_f + 0.25 * kl_g
    assert expected == pytest.approx(0.21055, abs=1e-4)
    assert float(consistency_loss(p_x, p_f, p_g)) == pytest.approx(expected, rel=1e-5)


def test_consistency_is_zero_when_consistent_and_uses_batch_mean() -> None:
    p = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    assert float(consistency_loss(p, p, p)) == pytest.approx(0.0, abs=1e-7)
    a = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    b = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    c = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert float(consistency_loss(a, b, c)) == pytest.approx(
        float(consistency_terms(a, b, c)[0]) / 2, rel=1e-6
    )


def test_kl_direction_and_gradient_flows_through_the_mixture() -> None:
    p, m = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    assert float(kl_div(p, m)) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert float(kl_div(p, m)) != pytest.approx(float(kl_div(m, p)))
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]], requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    consistency_loss(probs[:1], probs[1:2], probs[2:]).backward()
    assert logits.grad is not None
    assert all(float(logits.grad[i].abs().sum()) > 0 for i in range(3))  # no detach anywhere


def hand_dro(eta: float, adj: list[float], losses: list[float]) -> list[float]:
    return [eta * (loss + a) for loss, a in zip(losses, adj, strict=True)]


def test_class_conditional_gdro_update_matches_hand_computation() -> None:
    counts = torch.tensor([[100, 25], [25, 100]])
    dro = GroupDRO(counts, eta=0.1, adj_coef=1.0, class_conditional=True)
    losses = torch.tensor([1.0, 2.0, 0.5, 0.5], requires_grad=True)
    cells = torch.tensor([0, 1, 2, 3])
    value = dro.loss(losses, cells)
    adj = [1 / 10, 1 / 5, 1 / 5, 1 / 10]
    a = hand_dro(0.1, adj, [1.0, 2.0, 0.5, 0.5])
    q0 = [
        math.exp(a[0]) / (math.exp(a[0]) + math.exp(a[1])),
        math.exp(a[1]) / (math.exp(a[0]) + math.exp(a[1])),
    ]
    q1 = [
        math.exp(a[2]) / (math.exp(a[2]) + math.exp(a[3])),
        math.exp(a[3]) / (math.exp(a[2]) + math.exp(a[3])),
    ]
    assert dro.q.flatten().tolist() == pytest.approx(q0 + q1, rel=1e-6)
    expected = 0.5 * (q0[0] * 1.1 + q0[1] * 2.2) + 0.5 * (q1[0] * 0.7 + q1[1] * 0.6)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()  # q is detached: d value / d loss_i = w_y * q_i
    assert losses.grad.tolist() == pytest.approx([0.5 * q for q in q0 + q1], rel=1e-6)


def test_online_gdro_is_one_softmax_over_all_cells_and_accumulates() -> None:
    counts = torch.tensor([[100, 25], [25, 100]])
    dro = GroupDRO(counts, eta=0.01, adj_coef=0.0, class_conditional=False)
    losses, cells = torch.tensor([1.0, 3.0, 2.0, 0.0]), torch.tensor([0, 1, 2, 3])
    dro.loss(losses, cells)
    value = dro.loss(losses, cells)  # second step: logits = 2 * eta * loss
    a = [2 * 0.01 * v for v in (1.0, 3.0, 2.0, 0.0)]
    z = sum(math.exp(v) for v in a)
    q = [math.exp(v) / z for v in a]
    assert dro.q.flatten().tolist() == pytest.approx(q, rel=1e-6)
    assert float(value) == pytest.approx(
        sum(qi * li for qi, li in zip(q, (1.0, 3.0, 2.0, 0.0), strict=True)), rel=1e-6
    )


def test_gdro_ignores_absent_and_empty_cells() -> None:
    dro = GroupDRO(torch.tensor([[10, 0], [10, 10]]), eta=1.0, class_conditional=True)
    dro.loss(torch.tensor([1.0, 1.0]), torch.tensor([0, 2]))  # cell 3 absent, cell 1 empty
    q = dro.q
    assert q[0].tolist() == [1.0, 0.0]  # the empty cell never gets weight
    assert float(q[1, 0]) > float(q[1, 1])  # only the present cell's logit moved
    assert dro.class_weight.tolist() == pytest.approx([1 / 3, 2 / 3])
