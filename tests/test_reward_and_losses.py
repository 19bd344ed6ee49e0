import numpy as np
import pytest
import torch

from banditroute.policy.losses import clipped_importance_weights, entropy, reinforce_loss
from banditroute.policy.reward import PreferenceError, fit_tau, normalised_cost, preference_to_w_cost, reward, reward_matrix


def test_reward_formula():
    # r = (1 - w) * score - w * min(cost / tau, 1)
    assert reward(1.0, 0.5, 0.0, tau=1.0) == pytest.approx(1.0)
    assert reward(1.0, 0.5, 0.5, tau=1.0) == pytest.approx(0.5 - 0.25)
    assert reward(0.0, 5.0, 1.0, tau=1.0) == pytest.approx(-1.0)  # penalty saturates at 1
    assert reward(np.nan, 0.0, 0.3, tau=1.0) == pytest.approx(0.0)  # NaN score counts as 0


def test_reward_matrix_per_row_preference():
    scores = np.array([[1.0, 0.0], [1.0, 1.0]])
    costs = np.array([[2.0, 0.0], [2.0, 0.0]])
    r = reward_matrix(scores, costs, np.array([0.0, 1.0]), tau=2.0)
    np.testing.assert_allclose(r, [[1.0, 0.0], [-1.0, 0.0]])


def test_tau_is_quantile_and_positive():
    costs = np.arange(1, 101, dtype=float)
    assert fit_tau(costs, 0.95) == pytest.approx(np.quantile(costs, 0.95))
    assert fit_tau(np.zeros(5)) > 0
    np.testing.assert_allclose(normalised_cost([0.5, 3.0], 1.0), [0.5, 1.0])


@pytest.mark.parametrize(
    "quality, cost, match",
    [(-1, 1, "preference.quality"), (1, -0.1, "preference.cost"), (0, 0, "> 0"), ("a", 1, "preference.quality"), (1, float("nan"), "preference.cost")],
)
def test_bad_preferences_named(quality, cost, match):
    with pytest.raises(PreferenceError, match=match):
        preference_to_w_cost(quality, cost)


def test_preference_normalised_onto_simplex():
    assert preference_to_w_cost(3, 1) == pytest.approx(0.25)


def test_entropy_ignores_masked_models():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert entropy(logits).item() == pytest.approx(np.log(2))


def test_masked_logits_give_finite_gradients():
    logits = torch.tensor([[0.5, -0.2, float("-inf")]], requires_grad=True)
    loss, _ = reinforce_loss(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]), entropy_coef=0.1)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_reinforce_gradient_moves_towards_positive_advantage():
    logits = torch.zeros(1, 3, requires_grad=True)
    loss, _ = reinforce_loss(logits, torch.tensor([1]), torch.tensor([1.0]), torch.tensor([0.0]), entropy_coef=0.0)
    loss.backward()
    # descending the loss raises the chosen model's logit and lowers the others
    assert logits.grad[0, 1] < 0 and logits.grad[0, 0] > 0 and logits.grad[0, 2] > 0


def test_reinforce_zero_advantage_gives_zero_policy_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3])
    loss, _ = reinforce_loss(logits, torch.tensor([0, 1, 2, 0]), rewards, rewards.clone(), entropy_coef=0.0)
    loss.backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad))


def test_importance_weights_are_clipped():
    w = clipped_importance_weights(torch.tensor([0.9, 0.5]), torch.tensor([0.01, 0.5]), clip=5.0)
    assert w.tolist() == pytest.approx([5.0, 1.0])
