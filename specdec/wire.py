"""Conversions between protobuf messages and the engine's tensors and dataclasses."""

from __future__ import annotations

import numpy as np
import torch

from specdec.sampling import WIRE_DTYPE, SamplingParams
from specdec.v1 import generate_pb2, session_pb2


def sampling_from_proto(msg: generate_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
    ).validate()


def sampling_to_proto(params: SamplingParams) -> generate_pb2.SamplingParams:
    msg = generate_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def encode_probs(probs: torch.Tensor) -> list[session_pb2.ProbabilityRow]:
    """[n, vocab] float16 -> rows, each dense or sparse, whichever is smaller."""
    assert probs.dim() == 2 and probs.dtype == WIRE_DTYPE, f"probs must be [n, vocab] {WIRE_DTYPE}"
    rows = []
    vocab = probs.shape[1]
    for row in probs.cpu():
        nonzero = row.nonzero().flatten()  # [nnz]
        if nonzero.numel() * 6 < vocab * 2:  # sparse costs an int32 id + a float16 per entry
            rows.append(
                session_pb2.ProbabilityRow(
                    token_ids=nonzero.tolist(), probs=row[nonzero].numpy().astype("<f2").tobytes()
                )
            )
        else:
            rows.append(session_pb2.ProbabilityRow(probs=row.numpy().astype("<f2").tobytes()))
    return rows


def decode_probs(rows, vocab_size: int) -> torch.Tensor:
    """Rows -> [n, vocab] float64, each row normalised to sum to 1."""
    out = torch.zeros((len(rows), vocab_size), dtype=torch.float64)
    for i, row in enumerate(rows):
        values = torch.from_numpy(np.frombuffer(row.probs, dtype="<f2").astype(np.float64))
        if row.token_ids:
            ids = torch.tensor(row.token_ids, dtype=torch.long)
            if values.numel() != ids.numel() or ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"probability row {i}: {ids.numel()} ids, {values.numel()} values, vocab {vocab_size}")
            out[i, ids] = values
        elif values.numel() == vocab_size:
            out[i] = values
        else:
            raise ValueError(f"probability row {i}: {values.numel()} values for a vocabulary of {vocab_size}")
    totals = out.sum(dim=1, keepdim=True)
    if not torch.all(totals > 0):
        raise ValueError("a probability row sums to zero")
    return out / totals
