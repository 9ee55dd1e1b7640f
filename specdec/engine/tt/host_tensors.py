"""StepInputs as ttnn host tensors, in the dtypes and shapes the step reads. Needs ttnn (passed in,
so tests can pass a stand-in), no chip."""

from __future__ import annotations

import numpy as np

from specdec.engine.tt.step_inputs import ROWS, StepInputs


def host_tensor(ttnn, values, np_dtype, tt_dtype):
    """A row-major ttnn host tensor of `values`."""
    return ttnn.Tensor(np.asarray(values, dtype=np_dtype), data_type=tt_dtype, layout=ttnn.ROW_MAJOR_LAYOUT)


def tokens_host_tensor(ttnn, token_ids: list[int]) -> object:
    """[1, ROWS] uint32: the live rows' tokens, then zeros."""
    return host_tensor(ttnn, [list(token_ids) + [0] * (ROWS - len(token_ids))], np.uint32, ttnn.uint32)


def step_host_tensors(ttnn, inputs: StepInputs, write_rows: int, mask_heads: int = 0) -> dict[str, object]:
    """What the host copies into a step trace's buffers before a replay (see TtTransformer.step);
    mask_heads > 0 (the masked attention path): also each row's position once per head, the rows
    of the mask table the step looks up."""

    tensors = {
        "tokens": tokens_host_tensor(ttnn, inputs.token_ids[: inputs.live]),  # [1, ROWS]
        "positions": host_tensor(ttnn, inputs.positions, np.int32, ttnn.int32),  # [ROWS]
        "rope_positions": host_tensor(ttnn, [inputs.rope_positions], np.uint32, ttnn.uint32),  # [1, ROWS]
        "page_table": host_tensor(ttnn, inputs.page_table, np.int32, ttnn.int32),  # [ROWS, max_blocks]
    }
    if write_rows > 1:
        for j in range(write_rows):
            tensors[f"write_positions_{j}"] = host_tensor(ttnn, inputs.write_positions[j], np.int32, ttnn.int32)
    if mask_heads:
        rows = np.repeat(np.asarray(inputs.rope_positions), mask_heads)
        tensors["mask_positions"] = host_tensor(ttnn, [rows], np.uint32, ttnn.uint32)  # [1, ROWS * heads]
    return tensors


def prefill_host_tensors(ttnn, token_ids: list[int], padded_length: int, blocks: list[int]) -> dict[str, object]:
    tokens = np.zeros((1, padded_length), dtype=np.uint32)
    tokens[0, : len(token_ids)] = token_ids
    return {
        "tokens": ttnn.Tensor(tokens, data_type=ttnn.uint32, layout=ttnn.ROW_MAJOR_LAYOUT),
        "page_table": ttnn.Tensor(
            np.asarray([blocks], dtype=np.int32), data_type=ttnn.int32, layout=ttnn.ROW_MAJOR_LAYOUT
        ),
    }
