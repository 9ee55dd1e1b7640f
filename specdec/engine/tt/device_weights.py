"""Weights and RoPE tables onto the device. Runs only where a chip is present."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specdec.engine.config import ModelConfig
from specdec.engine.loading import cache_root, load_state_dict, safetensors_files
from specdec.engine.torch_model import rope_tables
from specdec.engine.tt.step_inputs import ROWS
from specdec.engine.tt.weights import (
    cached_host_tensors,
    causal_mask_table,
    interleave_rope_tables,
    model_arrays,
    rotation_matrix,
)

ROW_MAJOR_WEIGHTS = ("embedding", "norm")  # read as rows (embedding lookup, rms_norm weight), not tiles
LAYOUT_VERSION = 2  # of model_arrays' output: a cache written by another layout is not read


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Names the conversion cache: changes when the config or any weight file changes."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes() + f"layout {LAYOUT_VERSION}".encode())
    for path in safetensors_files(model_dir):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def device_weights(ttnn, device, config: ModelConfig, model_dir: Path, weights_dtype: str) -> dict[str, object]:
    def build() -> dict[str, np.ndarray]:
        state = load_state_dict(model_dir, torch.float32, torch.device("cpu"))
        return model_arrays(config, {name: tensor.numpy() for name, tensor in state.items()})

    cache_dir = cache_root() / "ttnn" / f"{model_dir.name}-{checkpoint_fingerprint(model_dir)}"
    weights = {}
    for name, host in cached_host_tensors(cache_dir, build).items():
        tensor = ttnn.to_device(host, device, memory_config=ttnn.DRAM_MEMORY_CONFIG)
        if not name.endswith(ROW_MAJOR_WEIGHTS):
            tensor = ttnn.to_layout(tensor, ttnn.TILE_LAYOUT)
            if weights_dtype != "bfloat16":  # bfloat8_b: block floats exist only in tiles, on device
                tensor = ttnn.typecast(tensor, getattr(ttnn, weights_dtype))
        weights[name] = tensor
    return weights


@dataclass
class RopeTables:
    """On device. rows: cos/sin [max_positions, head_dim] row-major, what the decode step looks up
    by position (ttnn.embedding takes row-major weights); tiles: the same [1, 1, max_positions,
    head_dim] tiled, sliced by prefill; rotations: one 32x32 tile per row [1, 1, 32 ROWS, 32]
    (the model shards it, one per core) and one [1, 1, 32, 32] for prefill."""

    cos_rows: object
    sin_rows: object
    cos_tiles: object
    sin_tiles: object
    rotation_decode: object
    rotation_prefill: object


def bfloat16_on_device(ttnn, device, array: np.ndarray, tiled: bool):
    """A float array as a bfloat16 device tensor in DRAM, tiled or row-major."""
    host = ttnn.Tensor(
        np.ascontiguousarray(array, dtype=np.float32), data_type=ttnn.float32, layout=ttnn.ROW_MAJOR_LAYOUT
    )
    tensor = ttnn.to_device(ttnn.to_dtype(host, ttnn.bfloat16), device, memory_config=ttnn.DRAM_MEMORY_CONFIG)
    return ttnn.to_layout(tensor, ttnn.TILE_LAYOUT) if tiled else tensor


def device_mask_table(ttnn, device, positions: int):
    """causal_mask_table on the device, row-major (ttnn.embedding reads row-major weights):
    positions^2 bfloat16 values (32 MiB at 4096)."""
    return bfloat16_on_device(ttnn, device, causal_mask_table(positions), tiled=False)


def device_rope_tables(ttnn, device, config: ModelConfig, max_seq_len: int) -> RopeTables:
    def on_device(array: np.ndarray, tiled: bool):
        return bfloat16_on_device(ttnn, device, array, tiled)

    cos, sin = rope_tables(config, max_seq_len, torch.float32)
    cos, sin = interleave_rope_tables(cos.numpy(), sin.numpy())
    rotation = rotation_matrix(32)
    return RopeTables(
        cos_rows=on_device(cos, tiled=False),
        sin_rows=on_device(sin, tiled=False),
        cos_tiles=on_device(cos[None, None], tiled=True),
        sin_tiles=on_device(sin[None, None], tiled=True),
        rotation_decode=on_device(np.tile(rotation, (ROWS, 1))[None, None], tiled=True),
        rotation_prefill=on_device(rotation[None, None], tiled=True),
    )
