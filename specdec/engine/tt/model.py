"""Our Llama / Qwen2 forward in ttnn ops, on one Wormhole chip. Runs only on a device.

Two passes share the weights and the paged KV cache:
- `step`: decode-shaped, ROWS rows, one token each; several sessions' rows side by side, each row
  at its own position with its own page-table row, dead rows at -1. It is what the traces
  capture: one KV write per layer when every session has one row (draft steps, plain decode), or
  one write per row of a session's block (verify: k+1 rows of each session).
- `prefill`: a prompt at position 0, eager (its length varies), KV filled through the page table.
Memory: activations interleaved in L1/DRAM; only the ops that demand it run sharded (the decode
rotary embedding, the KV update and concat-heads want one row per core, height-sharded).

Where the chip departs from ttnn's documented semantics (hazards.py says how each is guarded):
decode attention may see KV past a row's position inside its 32-position block, so with
`mask_table` set the step attends through an explicit mask; a bias is never broadcast inside a
trace (the decode step adds a bias already expanded to ROWS rows); no two rows of one tile go in
one KV update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import ttnn

from specdec.engine.config import ModelConfig
from specdec.engine.tt.step_inputs import ROWS


@dataclass
class LayerWeights:
    attention_norm: object
    wqkv: object
    bqkv: object | None  # [1, 1, 1, n]: prefill adds it, broadcast over the prompt (eager)
    bqkv_rows: object | None  # [1, 1, ROWS, n]: the step adds it, already one row per step row
    wo: object
    ffn_norm: object
    w_gate: object
    w_up: object
    w_down: object


class TtTransformer:
    def __init__(self, device, config: ModelConfig, weights: Mapping[str, object], kv_cache: list[tuple], rope):
        """weights: device tensors by model_arrays' names; kv_cache: (keys, values) per layer,
        [num_blocks, kv_heads, block_size, head_dim]; rope: device_weights.RopeTables."""
        self.device = device
        self.config = config
        self.embedding = weights["embedding"]
        self.norm = weights["norm"]
        self.lm_head = weights["lm_head"]
        self.layers = [
            LayerWeights(**{f: weights.get(f"layers.{i}.{f}") for f in LayerWeights.__dataclass_fields__})
            for i in range(config.num_layers)
        ]
        self.kv_cache = kv_cache
        self.rope = rope
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.compute = ttnn.WormholeComputeKernelConfig(
            math_fidelity=ttnn.MathFidelity.HiFi4, math_approx_mode=False, fp32_dest_acc_en=True, packer_l1_acc=True
        )
        grid = device.compute_with_storage_grid_size()
        self.row_cores = ttnn.num_cores_to_corerangeset(ROWS, grid, row_wise=True)  # one row per core
        self.sdpa_decode = ttnn.SDPAProgramConfig(
            compute_with_storage_grid_size=grid, q_chunk_size=0, k_chunk_size=0, exp_approx_mode=False
        )
        # paged non-causal attention needs a positive k chunk (the op's docstring)
        self.sdpa_masked = ttnn.SDPAProgramConfig(
            compute_with_storage_grid_size=grid, q_chunk_size=0, k_chunk_size=32, exp_approx_mode=False
        )
        self.mask_table = None  # [S, S] row-major (device_weights.causal_mask_table): the masked path
        self.rope_rows = self._row_shards(config.head_dim)
        self.rotation_decode = ttnn.interleaved_to_sharded(rope.rotation_decode, self._row_shards(32))
        self.head_rows = self._row_shards(config.head_dim, height=32 * math.ceil(config.num_heads / 32))

    def _row_shards(self, width: int, height: int = 32):
        return ttnn.create_sharded_memory_config(
            shape=(height, width),
            core_grid=self.row_cores,
            strategy=ttnn.ShardStrategy.HEIGHT,
            orientation=ttnn.ShardOrientation.ROW_MAJOR,
            use_height_and_width_as_shard_shape=True,
        )

    # --- the decode-shaped step -------------------------------------------------------------------

    @property
    def masked(self) -> bool:
        return self.mask_table is not None

    def step(self, inputs: Mapping[str, object], write_rows: int, candidates: int = 0) -> dict[str, object]:
        """inputs (device): tokens [1, ROWS] uint32, positions [ROWS] int32, rope_positions
        [1, ROWS] uint32, page_table [ROWS, max_blocks] int32, write_positions_j [ROWS] int32
        for j < write_rows when write_rows > 1, and on the masked path mask_positions
        [1, ROWS * heads] uint32 (host_tensors.py). Returns argmax [1, 1, ROWS, 1] uint32 and
        logits [1, 1, ROWS, vocab]; with candidates > 0 also each row's top `candidates` logits,
        top_values and top_indices [1, 1, ROWS, candidates]."""
        positions, page_table = inputs["positions"], inputs["page_table"]
        if write_rows == 1:
            writes = [positions]
        else:
            writes = [inputs[f"write_positions_{j}"] for j in range(write_rows)]
        mask = self.attention_mask(inputs["mask_positions"]) if self.masked else None  # once, for every layer
        cos, sin = (self._rope_rows(t, inputs["rope_positions"]) for t in (self.rope.cos_rows, self.rope.sin_rows))
        x = ttnn.unsqueeze_to_4D(ttnn.embedding(inputs["tokens"], self.embedding, layout=ttnn.TILE_LAYOUT))
        for layer, (keys, values) in zip(self.layers, self.kv_cache):
            h = ttnn.rms_norm(x, epsilon=self.config.rms_norm_eps, weight=layer.attention_norm)
            qkv = ttnn.linear(h, layer.wqkv, dtype=ttnn.bfloat16, memory_config=ttnn.L1_MEMORY_CONFIG)
            if layer.bqkv_rows is not None:  # not linear's bias=: that broadcasts, which a trace may not
                qkv = ttnn.add(qkv, layer.bqkv_rows, memory_config=ttnn.L1_MEMORY_CONFIG)
            q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
                qkv,
                num_heads=self.config.num_heads,
                num_kv_heads=self.config.num_kv_heads,
                memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG,
            )  # q [1, ROWS, heads, d], k and v [1, ROWS, kv_heads, d], one row per core
            q = ttnn.experimental.rotary_embedding_llama(q, cos, sin, self.rotation_decode, is_decode_mode=True)
            k = ttnn.experimental.rotary_embedding_llama(k, cos, sin, self.rotation_decode, is_decode_mode=True)
            for write in writes:  # no two live rows of one tile per update: they would lose writes
                ttnn.experimental.paged_update_cache(keys, k, update_idxs_tensor=write, page_table=page_table)
                ttnn.experimental.paged_update_cache(values, v, update_idxs_tensor=write, page_table=page_table)
            attn = self.decode_attention(q, keys, values, page_table, positions, mask)
            attn = ttnn.experimental.nlp_concat_heads_decode(
                ttnn.to_memory_config(attn, self.head_rows), num_heads=self.config.num_heads
            )
            attn = ttnn.to_memory_config(attn, ttnn.L1_MEMORY_CONFIG)  # [1, 1, ROWS, heads * d]
            x = ttnn.add(x, ttnn.linear(attn, layer.wo, memory_config=ttnn.L1_MEMORY_CONFIG))
            x = ttnn.add(x, self._mlp(layer, x, ttnn.L1_MEMORY_CONFIG))
        x = ttnn.rms_norm(x, epsilon=self.config.rms_norm_eps, weight=self.norm)
        logits = ttnn.linear(x, self.lm_head, dtype=ttnn.bfloat16, memory_config=ttnn.DRAM_MEMORY_CONFIG)
        argmax = ttnn.argmax(ttnn.untilize(logits), dim=3, keepdim=True)  # [1, 1, ROWS, 1]
        outputs = {"argmax": argmax, "logits": logits}
        if candidates:  # what sampling reads instead of the vocabulary-wide row (candidates.py)
            outputs["top_values"], outputs["top_indices"] = ttnn.topk(logits, k=candidates, dim=-1, sorted=False)
        return outputs

    def decode_attention(self, q, keys, values, page_table, positions, mask=None):
        """Each row over its own sequence up to its position: the kernel's causal mask, or with
        `mask` ([1, ROWS, heads, S], attention_mask) non-causal over the page table's S positions,
        the mask hiding what lies past each row's position. Returns [1, ROWS, heads (padded to
        32), d]."""
        return ttnn.transformer.paged_scaled_dot_product_attention_decode(
            q,
            keys,
            values,
            page_table,
            cur_pos_tensor=positions,  # rows at -1 are skipped either way
            is_causal=mask is None,
            attn_mask=mask,
            scale=self.scale,
            program_config=self.sdpa_decode if mask is None else self.sdpa_masked,
            compute_kernel_config=self.compute,
            memory_config=ttnn.DRAM_MEMORY_CONFIG,
        )

    def attention_mask(self, mask_positions):
        """[1, ROWS, heads, S]: row r, head h reads mask_table's row at r's position (0 up to
        it, MASKED past it); an embedding lookup, as the RoPE rows are, so it runs in the trace."""
        rows = ttnn.embedding(mask_positions, self.mask_table, layout=ttnn.TILE_LAYOUT)  # [1, ROWS heads, S]
        return ttnn.reshape(rows, [1, ROWS, self.config.num_heads, self.mask_table.shape[-1]])

    def _rope_rows(self, table, rope_positions):
        """cos or sin of each row's position, [1, ROWS, 1, d], one row per core."""
        rows = ttnn.unsqueeze_to_4D(ttnn.embedding(rope_positions, table, layout=ttnn.TILE_LAYOUT))
        return ttnn.interleaved_to_sharded(ttnn.transpose(rows, 1, 2), self.rope_rows)

    def _mlp(self, layer: LayerWeights, x, memory_config):
        h = ttnn.rms_norm(x, epsilon=self.config.rms_norm_eps, weight=layer.ffn_norm)
        gate = ttnn.linear(h, layer.w_gate, memory_config=memory_config)
        up = ttnn.linear(h, layer.w_up, memory_config=memory_config)
        hidden = ttnn.mul(gate, up, input_tensor_a_activations=[ttnn.UnaryOpType.SILU], memory_config=memory_config)
        return ttnn.linear(hidden, layer.w_down, memory_config=memory_config)

    # --- the prompt ------------------------------------------------------------------------------

    def prefill(self, tokens, length: int, page_table, fill_length: int, num_logits: int):
        """tokens (device): [1, S] uint32, S from prefill_lengths, the first `length` real;
        page_table (device): [1, n] int32, the blocks the prompt reaches, fill_length = n * block
        positions (<= S). Fills the KV of positions [0, fill_length) and returns (logits of the
        tiles holding the last num_logits real positions [1, 1, 32 t, vocab], first row's index)."""
        padded = tokens.shape[-1]
        d, kv_heads = self.config.head_dim, self.config.num_kv_heads
        cos = ttnn.slice(self.rope.cos_tiles, [0, 0, 0, 0], [1, 1, padded, d], [1, 1, 1, 1])
        sin = ttnn.slice(self.rope.sin_tiles, [0, 0, 0, 0], [1, 1, padded, d], [1, 1, 1, 1])
        x = ttnn.unsqueeze_to_4D(ttnn.embedding(tokens, self.embedding, layout=ttnn.TILE_LAYOUT))  # [1, 1, S, hidden]
        for layer, (keys, values) in zip(self.layers, self.kv_cache):
            h = ttnn.rms_norm(x, epsilon=self.config.rms_norm_eps, weight=layer.attention_norm)
            qkv = ttnn.linear(h, layer.wqkv, dtype=ttnn.bfloat16, memory_config=ttnn.DRAM_MEMORY_CONFIG)
            if layer.bqkv is not None:  # added apart, as tt_transformers' prefill does
                qkv = ttnn.add(qkv, layer.bqkv, memory_config=ttnn.DRAM_MEMORY_CONFIG)
            q, k, v = ttnn.experimental.nlp_create_qkv_heads(
                qkv,
                num_heads=self.config.num_heads,
                num_kv_heads=self.config.num_kv_heads,
                transpose_k_heads=False,
                memory_config=ttnn.DRAM_MEMORY_CONFIG,
            )  # q [1, heads, S, d], k and v [1, kv_heads, S, d]
            q = ttnn.experimental.rotary_embedding_llama(q, cos, sin, self.rope.rotation_prefill, is_decode_mode=False)
            k = ttnn.experimental.rotary_embedding_llama(k, cos, sin, self.rope.rotation_prefill, is_decode_mode=False)
            for cache, new in ((keys, k), (values, v)):  # padding rows past the prompt's blocks are not written
                fill = ttnn.slice(new, [0, 0, 0, 0], [1, kv_heads, fill_length, d], [1, 1, 1, 1])
                ttnn.experimental.paged_fill_cache(cache, fill, page_table, batch_idx=0)
            attn = ttnn.transformer.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, compute_kernel_config=self.compute
            )
            attn = ttnn.experimental.nlp_concat_heads(attn, memory_config=ttnn.DRAM_MEMORY_CONFIG)
            x = ttnn.add(x, ttnn.linear(attn, layer.wo, memory_config=ttnn.DRAM_MEMORY_CONFIG))
            x = ttnn.add(x, self._mlp(layer, x, ttnn.DRAM_MEMORY_CONFIG))
        first = (length - num_logits) // 32 * 32  # the LM head runs on the tiles that matter only
        last = -(-length // 32) * 32
        x = ttnn.slice(x, [0, 0, first, 0], [1, 1, last, self.config.hidden_size], [1, 1, 1, 1])
        x = ttnn.rms_norm(x, epsilon=self.config.rms_norm_eps, weight=self.norm)
        return ttnn.linear(x, self.lm_head, dtype=ttnn.bfloat16, memory_config=ttnn.DRAM_MEMORY_CONFIG), first
