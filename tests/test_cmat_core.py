"""CMAT's actor-critic arithmetic and long-term memory, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cmat_pipeline.cmat.memory import ReflectionMemory, template_reflection, with_lessons
from cmat_pipeline.cmat.objectives import actor_loss, reinforce_advantages, turn_advantages, value_loss


def test_td0_advantages_follow_eq4():
    rewards, values, gamma = [-0.5, 0.0, 1.0], [0.2, 0.4, 0.7], 0.9
    adv, targets = turn_advantages(rewards, values, gamma=gamma, lam=0.0)
    want = [-0.5 + 0.9 * 0.4 - 0.2, 0.0 + 0.9 * 0.7 - 0.4, 1.0 + 0.0 - 0.7]  # V = 0 after the last turn
    assert adv == pytest.approx(want)
    assert targets == pytest.approx([a + v for a, v in zip(want, values)])


def test_gae_with_lambda_one_is_return_minus_value():
    rewards, values, gamma = [0.0, -0.5, 1.0], [0.3, 0.1, 0.6], 0.95
    adv, _ = turn_advantages(rewards, values, gamma=gamma, lam=1.0)
    returns = [0.0 - 0.5 * 0.95 + 1.0 * 0.95**2, -0.5 + 0.95, 1.0]
    assert adv == pytest.approx([g - v for g, v in zip(returns, values)])
    assert reinforce_advantages(rewards, baseline=0.25, gamma=gamma) == pytest.approx([g - 0.25 for g in returns])
    with pytest.raises(ValueError, match="one of each per turn"):
        turn_advantages([1.0], [0.1, 0.2])


def test_actor_loss_clips_and_penalises_kl():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.9, 0.5, 0.1]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    out = actor_loss(new, old, old, adv, mask, clip=0.2, kl_coef=0.0)
    # token 1: ratio 1.8 clipped to 1.2; token 2: ratio 1; token 3 is masked out
    assert out.policy == pytest.approx(-(1.2 + 1.0) / 2) and out.clip_fraction == pytest.approx(0.5)
    out.loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0 and new.grad[0, 2] == 0  # clipped and masked: no gradient
    same = actor_loss(old, old, old, adv, mask)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.clip_fraction == 0.0
    drift = actor_loss(new.detach(), old, old, adv, mask, clip=None, kl_coef=1.0)
    want_kl = sum(math.exp(math.log(0.5) - math.log(p)) - 1 - (math.log(0.5) - math.log(p)) for p in (0.9, 0.5)) / 2
    assert drift.kl == pytest.approx(want_kl, rel=1e-5) and drift.policy == pytest.approx(-(1.8 + 1.0) / 2)


def test_value_loss_is_mse():
    assert float(value_loss(torch.tensor([0.0, 1.0]), [1.0, 1.0])) == pytest.approx(0.5)


def test_reflection_memory_recalls_similar_tasks_and_persists(tmp_path):
    path = tmp_path / "memory.sqlite"
    memory = ReflectionMemory(path)
    assert memory.add("How many flights left Oslo in March?", "counting", "Quote `Departure Date` in backticks.")
    assert not memory.add("How many flights left Oslo in March?", "counting", "Quote `Departure Date`  in backticks.")
    memory.add("What is the average fare of flights from Oslo?", "aggregation-AVG", "Round the average as asked.")
    memory.add("Which hotel has the most rooms?", "ranking", "Order descending and LIMIT 1.")
    memory.close()
    memory = ReflectionMemory(path)  # persisted
    assert len(memory) == 3
    lessons = memory.recall("How many flights left Oslo in April?", "counting", k=2)
    assert lessons[0] == "Quote `Departure Date` in backticks." and "Order descending and LIMIT 1." not in lessons
    assert memory.recall("Completely unrelated words here", "counting") == []
    assert with_lessons("Q?", []) == "Q?"
    assert with_lessons("Q?", ["a"]).endswith("- a\n\nQ?")
    assert "backticks" in template_reflection(["unknown_table"], "completed")
