"""RL losses (fastgpt.losses, PPO part) against hand computations and brute-force references."""
from __future__ import annotations

import math

import pytest
import torch

from fastgpt.losses import (AdaptiveKLController, combine_ensemble, explained_variance, gae, kl_estimate,
                            length_penalty, masked_mean, ppo_policy_loss, ppo_value_loss, whiten)


def gae_reference(rewards, values, lengths, gamma, lam):
    """Textbook GAE with Python loops over each sequence's real tokens."""
    adv = [[0.0] * len(r) for r in rewards]
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            running = delta + gamma * lam * running
            adv[i][t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_brute_force(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    lengths = [7, 3, 1, 5]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref = torch.tensor(gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, (ref + values) * mask)
    assert float(adv[~mask].abs().sum()) == 0  # padding never leaks in


def test_kl_estimates():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    # k3 = (q/p - 1) - log(q/p)
    expect = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), expect)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_policy_loss_hand_computed():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.tensor([1, 1, 1, 0])
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    r = torch.tensor([1.5, 0.5, 1.1])
    assert approx_kl.item() == pytest.approx(float(((r - 1) - r.log()).mean()), rel=1e-5)


def test_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.log(torch.tensor([1.5])).requires_grad_()
    loss, _, _ = ppo_policy_loss(logp, torch.zeros(1), torch.ones(1), torch.ones(1), 0.2)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_value_loss_hand_computed():
    values, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, 1.0])
    mask = torch.ones(2)
    loss, frac = ppo_value_loss(values, old, ret, mask, clip=0.2)
    # token 0: v clipped to 0.7: max(1.0, 0.49) = 1.0; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    values = torch.tensor([1.0])
    loss, frac = ppo_value_loss(values, torch.tensor([0.5]), torch.tensor([2.0]), torch.ones(1), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (2.0 - 0.7) ** 2) and frac.item() == 1.0
    loss, _ = ppo_value_loss(values, torch.tensor([0.5]), torch.tensor([2.0]), torch.ones(1), clip=0.0)
    assert loss.item() == pytest.approx(0.5)


def test_whiten_and_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    w = whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-5, rtol=0)
    s = whiten(x, mask, shift_mean=False)  # rescaled by std 1, mean kept
    torch.testing.assert_close(s, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-5, rtol=0)


def test_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0])
    assert explained_variance(ret, ret, torch.ones(3)) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(3) + 2.0, ret, torch.ones(3)) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(5.7, n_steps=100)  # error -0.05, unclipped
    assert ctl.value == pytest.approx(0.1 * (1 - 0.05 * 100 / 10000))
    ctl2 = AdaptiveKLController(1.0, 6.0, 10000)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.value == ctl.value


def test_length_penalty_is_the_documented_distance_to_the_target():
    pen = length_penalty(torch.tensor([0, 5, 10, 20]), target=10.0, coef=0.5)
    assert torch.allclose(pen, torch.tensor([0.5, 0.25, 0.0, 0.5]))  # coef * |len - target| / target
    with pytest.raises(ValueError, match="positive"):
        length_penalty(torch.tensor([1]), target=0.0, coef=1.0)


def test_ensemble_of_one_model_is_that_model():
    one = torch.tensor([[0.3, -1.2, 2.0]])
    for mode in ("mean", "min", "lcb"):
        assert torch.equal(combine_ensemble(one, mode), one[0])


def test_ensemble_modes():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert torch.allclose(combine_ensemble(s, "mean"), torch.tensor([2.0, 0.0]))
    assert torch.allclose(combine_ensemble(s, "min"), torch.tensor([1.0, 0.0]))
    # lcb: the disagreement (std) is taken off the mean; agreement costs nothing
    assert torch.allclose(combine_ensemble(s, "lcb"), torch.tensor([2.0 - 2 ** 0.5, 0.0]))
    with pytest.raises(ValueError, match="expected one of"):
        combine_ensemble(s, "max")
