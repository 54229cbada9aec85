"""The actor-critic arithmetic of CMAT (paper eqs. 3-5), as pure functions on tensors.

Turn-level states: s_t is the conversation before assistant turn t, r_t the reward after it (the
Checker's per-turn feedback, plus task success on the last turn), V the critic's value estimate.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)            (eq. 4, V = 0 after the last turn)
    A_t     = sum_k (gamma * lam)^k * delta_{t+k}          (GAE; lam = 0 gives TD(0): A_t = delta_t)
    target  = A_t + V(s_t)                                  (the critic's TD(lambda) regression target)

The actor update is the policy gradient of eq. 3 weighted by A_t on every token of turn t. We add what
the paper leaves out so that learning stays stable, each switchable for ablations: a clipped importance
ratio (PPO) and a KL penalty to the SFT reference policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def turn_advantages(rewards: Sequence[float], values: Sequence[float], gamma: float = 0.99,
                    lam: float = 0.0) -> tuple[list[float], list[float]]:
    """(advantages, value targets) for one episode's turns; the episode ends after the last turn."""
    if len(rewards) != len(values):
        raise ValueError(f"{len(rewards)} rewards but {len(values)} values: one of each per turn")
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def reinforce_advantages(rewards: Sequence[float], baseline: float, gamma: float = 0.99) -> list[float]:
    """Ablation without a critic: discounted return minus a baseline (e.g. the batch's mean return)."""
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running - baseline
    return out


def normalize(advantages, eps: float = 1e-8):
    """Zero mean, unit variance over the batch (a single element is returned centred)."""
    import torch

    adv = torch.as_tensor(advantages, dtype=torch.float32)
    if adv.numel() < 2:
        return adv - adv.mean()
    return (adv - adv.mean()) / (adv.std() + eps)


@dataclass
class ActorLoss:
    loss: "object"        # scalar tensor to backpropagate
    policy: float         # the clipped surrogate's value
    kl: float             # mean KL estimate to the reference
    clip_fraction: float  # share of tokens whose ratio was clipped


def actor_loss(logp_new, logp_old, logp_ref, advantages, mask, clip: float | None = 0.2,
               kl_coef: float = 0.05) -> ActorLoss:
    """Token-level clipped policy-gradient loss with a KL penalty to the reference policy.

    All tensors are [batch, tokens]; `advantages` holds each token's turn advantage and `mask` marks
    the assistant tokens being trained. `clip=None` gives the plain policy gradient of eq. 3
    (ratio = 1 at the rollout policy), `kl_coef=0` drops the penalty.
    """
    import torch

    mask = mask.float()
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logp_new - logp_old)
    surrogate = ratio * advantages
    if clip is not None:
        clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
        surrogate = torch.minimum(surrogate, clipped)
        clip_fraction = (((ratio - 1).abs() > clip).float() * mask).sum() / n
    else:
        clip_fraction = torch.zeros(())
    policy = -(surrogate * mask).sum() / n
    # k3 estimator of KL(new || ref): unbiased, always >= 0 (Schulman, "Approximating KL divergence")
    log_ratio_ref = logp_ref - logp_new
    kl = ((torch.exp(log_ratio_ref) - 1 - log_ratio_ref) * mask).sum() / n
    loss = policy + kl_coef * kl
    return ActorLoss(loss, float(policy.detach()), float(kl.detach()), float(clip_fraction))


def value_loss(predicted, targets):
    """Mean squared TD error of the critic (eq. 5)."""
    import torch

    return torch.nn.functional.mse_loss(predicted, torch.as_tensor(targets, dtype=predicted.dtype))
