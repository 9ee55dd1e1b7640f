"""A chi-square goodness-of-fit test, without scipy."""

from __future__ import annotations

from collections import Counter

import torch


def chi_square_pvalue(samples: list, expected: dict, min_expected: float = 5.0) -> float:
    """p-value that `samples` were drawn from `expected` (outcome -> probability, summing to 1).
    Outcomes whose expected count is below min_expected are pooled into one cell."""
    n = len(samples)
    counts = Counter(samples)
    assert set(counts) <= set(expected), f"outcomes never expected: {set(counts) - set(expected)}"
    observed, wanted = [], []
    pooled_observed = pooled_wanted = 0.0
    for outcome, prob in expected.items():
        if prob * n >= min_expected:
            observed.append(counts.get(outcome, 0))
            wanted.append(prob * n)
        else:
            pooled_observed += counts.get(outcome, 0)
            pooled_wanted += prob * n
    if pooled_wanted > 0:
        observed.append(pooled_observed)
        wanted.append(pooled_wanted)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(wanted, dtype=torch.float64)
    statistic = ((o - e) ** 2 / e).sum()
    dof = torch.tensor(len(observed) - 1, dtype=torch.float64)
    return float(1 - torch.special.gammainc(dof / 2, statistic / 2))
