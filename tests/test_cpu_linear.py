"""The CPU linear variants compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specdec.engine import cpu_linear
from specdec.engine.cpu_linear import OneDnnLinear, TwoRowLinear, prepare_cpu_linears


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_onednn_linear_equals_nn_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True)
    x = torch.randn(1, rows, 96)
    with torch.inference_mode():
        assert torch.allclose(OneDnnLinear(linear)(x), linear(x), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_two_row_linear_equals_nn_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = TwoRowLinear(linear)(x)
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
    assert isinstance(model["bf16_fast_pair"], TwoRowLinear)
    assert type(model["bf16_plain"]) is nn.Linear and type(model["f64"]) is nn.Linear
    if cpu_linear.onednn_available():
        assert isinstance(model["f32"], OneDnnLinear) and counts == {"onednn": 1, "two_row": 1}
