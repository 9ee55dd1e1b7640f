"""The ttnn backend against the pinned ttnn (0.81.1): every call it makes exists with the keywords
it passes, and its weights convert to host tensors and back. Runs where ttnn imports (Python 3.10 or
3.12; scripts/test.sh runs this folder in .venv-tt); skipped elsewhere. Needs no chip."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from tests.tt.ttnn_api import Call, check, parse_nb_signature, ttnn_calls

BACKEND = sorted((Path(__file__).parents[2] / "specdec" / "engine" / "tt").glob("*.py"))
PINNED = "0.81.1"


@pytest.fixture(scope="module")
def ttnn():
    module = pytest.importorskip("ttnn", reason="ttnn installs on Python 3.10 / 3.12 only (.venv-tt)")
    assert importlib.metadata.version("ttnn") == PINNED, "the backend is checked against the pinned ttnn"
    return module


def test_every_ttnn_call_of_the_backend_exists_with_the_keywords_it_passes(ttnn):
    calls, names = ttnn_calls(BACKEND)
    called = {c.name for c in calls}
    # The checked set covers the steps the backend is made of, not a handful of helpers.
    for essential in (
        "ttnn.begin_trace_capture",
        "ttnn.execute_trace",
        "ttnn.copy_host_to_device_tensor",
        "ttnn.experimental.paged_update_cache",
        "ttnn.transformer.paged_scaled_dot_product_attention_decode",
        "ttnn.experimental.rotary_embedding_llama",
        "ttnn.argmax",
        "ttnn.topk",
        "ttnn.linear",
        "ttnn.rms_norm",
    ):
        assert essential in called, f"{essential} is no longer called: update this list"
    assert check(ttnn, BACKEND) == []


def test_the_check_reports_a_wrong_keyword_a_missing_op_and_a_missing_constant(ttnn, tmp_path):
    source = tmp_path / "drifted.py"
    source.write_text(
        "import ttnn\n"
        "y = ttnn.linear(a, b, transpose_b=True)\n"  # fine
        "y = ttnn.linear(a, b, made_up_keyword=1)\n"
        "y = ttnn.experimental.no_such_op(x)\n"
        "layout = ttnn.NO_SUCH_LAYOUT\n"
        "y = ttnn.argmax(x, 3, True, False, None)\n"  # argmax takes 3 positional arguments
    )
    problems = check(ttnn, [source])
    assert len(problems) == 4, problems
    assert any("made_up_keyword" in p for p in problems)
    assert any("no_such_op" in p for p in problems)
    assert any("NO_SUCH_LAYOUT" in p for p in problems)
    assert any("drifted.py:6" in p for p in problems)


def test_nanobind_signatures_parse_with_nested_brackets_and_keyword_only_parameters():
    params = parse_nb_signature(
        "def __call__(self, cache_tensor: ttnn.Tensor, input_tensor: ttnn.Tensor, *, "
        "update_idxs: collections.abc.Sequence[int] = \\0, mesh_coords: collections.abc.Set[a.B, c.D] | None = \\6, "
        'program_config: "ttnn::ops::Config" | None = \\7) -> ttnn.Tensor'
    )
    assert params.positional == ("cache_tensor", "input_tensor")
    assert params.keyword == {"cache_tensor", "input_tensor", "update_idxs", "mesh_coords", "program_config"}
    assert params.accepts(Call("f", ("update_idxs",), 2, "x"))
    assert not params.accepts(Call("f", (), 3, "x"))  # keyword-only cannot be passed by position
    assert not params.accepts(Call("f", ("cache_tensor",), 1, "x"))  # given twice


def test_weights_convert_to_bfloat16_host_tensors_and_come_back_from_the_disk_cache(ttnn, tmp_path):
    from specdec.engine.tt.weights import cached_host_tensors

    rng = np.random.default_rng(0)
    arrays = {"wqkv": rng.standard_normal((64, 96)).astype(np.float32), "norm": rng.random(64).astype(np.float32)}
    builds = []

    def build():
        builds.append(1)
        return arrays

    first = cached_host_tensors(tmp_path, build)
    second = cached_host_tensors(tmp_path, build)
    assert len(builds) == 1, "the second start must read the cache, not convert again"
    for name, array in arrays.items():
        a = ttnn.to_dtype(first[name], ttnn.float32).to_numpy()
        b = ttnn.to_dtype(second[name], ttnn.float32).to_numpy()
        assert first[name].dtype == ttnn.bfloat16 and tuple(first[name].shape) == array.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, array, rtol=2**-8, atol=0)  # bfloat16 keeps 8 bits of mantissa


def test_an_interrupted_conversion_is_redone_not_half_read(ttnn, tmp_path):
    from specdec.engine.tt.weights import cached_host_tensors

    arrays = {"a": np.ones((2, 32), np.float32), "b": np.zeros((2, 32), np.float32)}
    cached_host_tensors(tmp_path, lambda: arrays)
    (tmp_path / "complete").unlink()  # as if the process died before the marker
    (tmp_path / "b.tensorbin").unlink()
    redone = cached_host_tensors(tmp_path, lambda: arrays)
    assert set(redone) == {"a", "b"} and (tmp_path / "complete").exists()


def test_step_inputs_become_host_tensors_of_the_dtypes_and_shapes_the_step_reads(ttnn):
    from specdec.engine.tt.host_tensors import prefill_host_tensors, step_host_tensors
    from specdec.engine.tt.step_inputs import DEAD, ROWS, Piece, step_inputs

    inputs = step_inputs([Piece(40, [5, 6, 7], [3, 9]), Piece(8, [2], [4])], max_blocks=4, write_rows=4)
    tensors = step_host_tensors(ttnn, inputs, write_rows=4)
    assert set(tensors) == {"tokens", "positions", "rope_positions", "page_table"} | {
        f"write_positions_{j}" for j in range(4)
    }
    expect = {
        "tokens": (ttnn.uint32, (1, ROWS)),
        "positions": (ttnn.int32, (ROWS,)),
        "rope_positions": (ttnn.uint32, (1, ROWS)),
        "page_table": (ttnn.int32, (ROWS, 4)),
        "write_positions_2": (ttnn.int32, (ROWS,)),
    }
    for name, (dtype, shape) in expect.items():
        assert tensors[name].dtype == dtype and tuple(tensors[name].shape) == shape, name
        assert tensors[name].layout == ttnn.ROW_MAJOR_LAYOUT
    assert tensors["tokens"].to_numpy()[0, :5].tolist() == [5, 6, 7, 2, 0]
    assert tensors["positions"].to_numpy()[:5].tolist() == [40, 41, 42, 8, DEAD]
    assert tensors["write_positions_0"].to_numpy()[:5].tolist() == [40, DEAD, DEAD, 8, DEAD]
    assert tensors["write_positions_2"].to_numpy()[:5].tolist() == [DEAD, DEAD, 42, DEAD, DEAD]
    assert tensors["page_table"].to_numpy()[1].tolist() == [3, 9, 9, 9]
    assert tensors["page_table"].to_numpy()[3].tolist() == [4, 4, 4, 4]
    one_row = step_inputs([Piece(7, [1], [0])], 1, 1)
    assert "write_positions_0" not in step_host_tensors(ttnn, one_row, write_rows=1)

    prefill = prefill_host_tensors(ttnn, [11, 12, 13], padded_length=128, blocks=[3])
    assert tuple(prefill["tokens"].shape) == (1, 128) and prefill["tokens"].to_numpy()[0, :4].tolist() == [
        11,
        12,
        13,
        0,
    ]
    assert prefill["page_table"].to_numpy().tolist() == [[3]]
