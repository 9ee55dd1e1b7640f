"""The CPU linear variants compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specdec.engine import cpu_linear
from specdec.engine.cpu_linear import BFloat16Linear, OneDnnLinear, prepare_cpu_linears


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 5), (1, 9), (1, 17), (1, 100), (300,)])
def test_onednn_linear_equals_nn_linear(shape):
    """Also at row counts it pads (17 -> 18, 100 -> 104, 300 -> 320): the padding never shows."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True)
    x = torch.randn(*shape, 96)
    with torch.inference_mode():
        out = OneDnnLinear(linear)(x)
        assert out.shape == (*shape, 80)
        assert torch.allclose(out, linear(x), atol=1e-5)


def test_padded_rows_bounds_the_row_counts():
    """Exact up to 16 rows; above, under 12.5 % padding and 8 counts per power of two, so every
    prefill length up to 8192 reuses one of 16 + 8 * 9 primitives per shape."""
    counts = {cpu_linear.padded_rows(m) for m in range(1, 8193)}
    assert all(cpu_linear.padded_rows(m) == m for m in range(1, 17))
    assert all(m <= cpu_linear.padded_rows(m) < 1.125 * m for m in range(17, 8193))
    assert len(counts) <= 16 + 8 * 9
    assert all(cpu_linear.padded_rows(p) == p for p in counts)  # a padded count pads to itself


@pytest.mark.parametrize("lone_row_as_two", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 17, 100])
def test_bfloat16_linear_equals_nn_linear(rows, lone_row_as_two):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = BFloat16Linear(linear, lone_row_as_two)(x)
        assert out.shape == (1, rows, 48)
        assert torch.allclose(out.float(), linear(x).float(), atol=1e-2)


def test_prepare_swaps_by_dtype(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_two_rows_faster", lambda linear: linear.out_features == 48)
    model = nn.ModuleDict(
        {
            "f32": nn.Linear(64, 32),
            "bf16_fast_pair": nn.Linear(64, 48).to(torch.bfloat16),
            "bf16_plain": nn.Linear(64, 40).to(torch.bfloat16),
            "f64": nn.Linear(64, 32).double(),
        }
    )
    counts = prepare_cpu_linears(model)
    assert isinstance(model["bf16_fast_pair"], BFloat16Linear) and model["bf16_fast_pair"].lone_row_as_two
    assert isinstance(model["bf16_plain"], BFloat16Linear) and not model["bf16_plain"].lone_row_as_two
    assert type(model["f64"]) is nn.Linear
    if cpu_linear.onednn_available():
        assert isinstance(model["f32"], OneDnnLinear) and counts == {"onednn": 1, "bfloat16": 2, "two_row": 1}
