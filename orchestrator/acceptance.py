"""Which proposed tokens the target accepts, and the token it adds after them. Pure functions.

Both return (accepted, next_token): `accepted` is how many of the k proposed tokens are kept
(0..k), `next_token` the target's own token after them: the correction on a rejection, the bonus
token when all k were accepted. A step therefore always emits accepted + 1 tokens.
"""

from __future__ import annotations

import torch


def accept_greedy(proposed: list[int], target_argmax: list[int]) -> tuple[int, int]:
    """proposed: [k]; target_argmax: [k + 1], the target's choice after each of the k + 1 positions."""
    assert len(target_argmax) == len(proposed) + 1, (
        f"need k + 1 = {len(proposed) + 1} target tokens, got {len(target_argmax)}"
    )
    accepted = 0
    while accepted < len(proposed) and proposed[accepted] == target_argmax[accepted]:
        accepted += 1
    return accepted, target_argmax[accepted]


def accept_sampled(
    proposed: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor, generator: torch.Generator
) -> tuple[int, int]:
    """Lossless rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    proposed: [k], each drawn from its row of draft_probs
    draft_probs: [k, vocab] q, the draft's processed distributions
    target_probs: [k + 1, vocab] p, the target's processed distributions
    """
    k = len(proposed)
    assert draft_probs.shape[0] == k and target_probs.shape[0] == k + 1, (
        f"need q of [k, vocab] and p of [k + 1, vocab] for k = {k}, got {tuple(draft_probs.shape)} and {tuple(target_probs.shape)}"
    )
    for i, token in enumerate(proposed):
        p, q = target_probs[i, token], draft_probs[i, token]
        # p >= q: always accept; else accept with probability p / q  (u < p / q, written without dividing)
        if torch.rand((), generator=generator, dtype=torch.float64) * q < p:
            continue
        # Rejected: draw the correction from the part of p that q under-covers, norm(max(0, p - q)).
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        if residual.sum() <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = target_probs[i]
        return i, sample(residual, generator)
    return k, sample(target_probs[k], generator)  # all accepted: the bonus token comes from p


def sample(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token from unnormalised weights [vocab]."""
    return int(torch.multinomial(weights, 1, generator=generator))
