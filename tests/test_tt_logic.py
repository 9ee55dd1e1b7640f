"""The Tenstorrent backend's logic that needs no chip: KV block loans, step inputs (positions,
page tables, row-by-row writes) checked against dense attention through a paged-cache model of the
device, trace capture/replay order, device ownership, and the weight layout's RoPE algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.engine.blocks import BlockPool
from specdec.engine.config import ModelConfig
from specdec.engine.torch_model import apply_rope, rope_tables
from specdec.engine.tt.candidates import CANDIDATES, logits_from_candidates, samples_from_candidates
from specdec.engine.tt.device import DeviceOwner, DeviceUnavailable, tt_fatal_reason
from specdec.engine.tt.step_inputs import (
    DEAD,
    ROWS,
    Piece,
    blocks_written_by_prefill,
    pack_passes,
    prefill_length,
    prefill_lengths,
    session_positions,
    slot_of,
    step_inputs,
)
from specdec.engine.tt.traces import StepTraces
from specdec.engine.tt.weights import (
    causal_mask_table,
    interleave_rope_rows,
    interleave_rope_tables,
    layer_arrays,
    model_arrays,
    rotation_matrix,
)
from specdec.errors import ResourceExhausted
from specdec.sampling import SamplingParams, processed_probs

# --- KV blocks ---------------------------------------------------------------------------------


def test_blocks_are_lent_for_a_capacity_and_returned():
    pool = BlockPool(num_blocks=5, block_size=32)
    a = pool.allocate(33)  # two blocks
    b = pool.allocate(96)  # three
    assert len(a) == 2 and len(b) == 3 and not set(a) & set(b) and pool.free_blocks == 0
    with pytest.raises(ResourceExhausted, match="0 free blocks of 32 positions; capacity 1 needs 1"):
        pool.allocate(1)
    pool.release(a)
    assert pool.free_blocks == 2
    assert sorted(pool.allocate(64)) == sorted(a)


def test_a_block_returned_twice_or_never_lent_is_refused():
    pool = BlockPool(num_blocks=4, block_size=8)
    blocks = pool.allocate(8)
    pool.release(blocks)
    with pytest.raises(ValueError, match="not on loan"):
        pool.release(blocks)
    with pytest.raises(ValueError, match="not on loan"):
        pool.release([9])
    assert pool.free_blocks == 4


# --- step inputs -------------------------------------------------------------------------------


def test_verify_inputs_put_live_rows_first_and_write_one_row_per_pass():
    inputs = step_inputs([Piece(30, [7, 8, 9], [4, 1])], max_blocks=3, write_rows=5)
    assert inputs.token_ids[:4] == [7, 8, 9, 0] and len(inputs.token_ids) == ROWS
    assert inputs.positions[:4] == [30, 31, 32, DEAD] and inputs.positions.count(DEAD) == ROWS - 3
    assert inputs.rope_positions[:4] == [30, 31, 32, 0]
    assert len(inputs.write_positions) == 5
    for j, row in enumerate(inputs.write_positions):
        live = [i for i, p in enumerate(row) if p != DEAD]
        assert live == ([j] if j < 3 else []), "each write pass carries exactly one row's position"
        assert all(row[i] == inputs.positions[i] for i in live)
    assert inputs.page_table == [[4, 1, 1]] * ROWS  # padding repeats the last block


def test_sessions_side_by_side_each_read_their_own_blocks_and_share_writes_only_across_sessions():
    pieces = [Piece(30, [7, 8, 9], [4, 1]), Piece(5, [6], [2]), Piece(62, [1, 2], [0, 3, 5])]
    inputs = step_inputs(pieces, max_blocks=3, write_rows=4)
    assert [list(r) for r in inputs.rows] == [[0, 1, 2], [3], [4, 5]] and inputs.live == 6
    assert inputs.positions[:7] == [30, 31, 32, 5, 62, 63, DEAD]
    assert inputs.page_table[:6] == [[4, 1, 1]] * 3 + [[2, 2, 2]] + [[0, 3, 5]] * 2
    # write j carries the j-th row of each session: never two rows of one session (one tile)
    assert [[r for r, p in enumerate(w) if p != DEAD] for w in inputs.write_positions] == [[0, 3, 4], [1, 5], [2], []]
    for write in inputs.write_positions:
        tiles = [slot_of(p, inputs.page_table[r], 32)[0] for r, p in enumerate(write) if p != DEAD]
        assert len(set(tiles)) == len(tiles)


def test_chunks_pack_into_passes_of_32_rows_and_a_long_chunk_goes_on_in_later_passes():
    passes = pack_passes([5, 1, 40, 5, 5, 5, 5, 5], write_rows=9)
    assert passes[0] == [(0, 0, 5), (1, 0, 1), (2, 0, 9), (3, 0, 5), (4, 0, 5), (5, 0, 5), (6, 0, 2)]
    assert all(sum(n for _, _, n in p) <= ROWS and len({i for i, _, _ in p}) == len(p) for p in passes)
    pieces_of_2 = [(first, n) for p in passes for i, first, n in p if i == 2]
    assert pieces_of_2 == [(0, 9), (9, 9), (18, 9), (27, 9), (36, 4)]  # in order, one pass each
    covered = {i: sum(n for p in passes for j, _, n in p if j == i) for i in range(8)}
    assert covered == {0: 5, 1: 1, 2: 40, 3: 5, 4: 5, 5: 5, 6: 5, 7: 5}


def test_step_inputs_refuse_more_tokens_than_write_rows_or_blocks_past_the_table():
    with pytest.raises(ValueError, match="1..2 tokens"):
        step_inputs([Piece(0, [1, 2, 3], [0])], 1, write_rows=2)
    with pytest.raises(ValueError, match="page table"):
        step_inputs([Piece(0, [1], [0, 1])], 1, write_rows=1)
    with pytest.raises(ValueError, match="1..32 rows"):
        step_inputs([Piece(0, [1] * 9, [i]) for i in range(4)], 1, write_rows=9)


def test_prefill_pads_to_a_short_ladder_of_lengths_and_writes_only_the_prompts_blocks():
    assert prefill_lengths(4096) == [128, 256, 512, 1024, 2048, 4096]
    assert prefill_lengths(200) == [128, 256] and prefill_lengths(100) == [128]
    assert [prefill_length(n, 4096) for n in (1, 128, 129, 3000)] == [128, 128, 256, 4096]
    assert session_positions(1) == 128 and session_positions(200) == 256
    blocks = [7, 3, 9, 4]  # a session of 128 positions, 32 per block
    assert blocks_written_by_prefill(33, blocks, 32) == [7, 3]  # padding past position 63 is not written
    assert blocks_written_by_prefill(128, blocks, 32) == blocks


class PagedDevice:
    """What the device does with StepInputs, one attention head, in numpy: writes K/V through the
    page table pass by pass, then each live row attends to positions [0, its position]."""

    def __init__(self, num_blocks: int, block_size: int, dim: int):
        self.block_size = block_size
        self.keys = np.zeros((num_blocks, block_size, dim))
        self.values = np.zeros((num_blocks, block_size, dim))

    def step(self, inputs, q, k, v):
        for row_positions in inputs.write_positions:
            for r, position in enumerate(row_positions):
                if position != DEAD:
                    block, offset = slot_of(position, inputs.page_table[r], self.block_size)
                    self.keys[block, offset], self.values[block, offset] = k[r], v[r]
        out = np.full_like(q, np.nan)
        for r, position in enumerate(inputs.positions):
            if position == DEAD:
                continue
            slots = [slot_of(p, inputs.page_table[r], self.block_size) for p in range(position + 1)]
            keys = np.stack([self.keys[b, o] for b, o in slots])
            values = np.stack([self.values[b, o] for b, o in slots])
            weights = np.exp(keys @ q[r] - (keys @ q[r]).max())
            out[r] = weights @ values / weights.sum()
        return out


def dense_attention(q, keys, values):
    """Row i of q attends causally to keys[: len(keys) - len(q) + i + 1]."""
    out = []
    offset = len(keys) - len(q)
    for i, row in enumerate(q):
        scores = keys[: offset + i + 1] @ row
        weights = np.exp(scores - scores.max())
        out.append(weights @ values[: offset + i + 1] / weights.sum())
    return np.stack(out)


def test_two_sessions_side_by_side_with_scattered_blocks_rollbacks_and_split_passes_match_dense_attention():
    dim, block_size, write_rows = 4, 4, 5
    rng = np.random.default_rng(0)
    device = PagedDevice(num_blocks=12, block_size=block_size, dim=dim)
    pool = BlockPool(12, block_size)
    pool.allocate(4)  # scatter: the sessions get blocks that are neither first nor contiguous
    sessions = {name: {"blocks": pool.allocate(20), "kv": []} for name in ("a", "b")}
    max_blocks = 5

    def run(*commands):
        """(session, start, n) each: n new tokens at `start` (a rollback when start < length),
        all sessions' rows in the same passes; checks every live row against dense attention."""
        new = {}
        for name, start, n in commands:
            del sessions[name]["kv"][start:]  # rollback: only the position moves on the device
            new[name] = (start, [rng.standard_normal((3, dim)) for _ in range(n)])  # q, k, v per token
        names = [name for name, _, _ in commands]
        for pieces in pack_passes([len(new[name][1]) for name in names], write_rows):
            parts = [
                (names[i], new[names[i]][0] + first, new[names[i]][1][first : first + n]) for i, first, n in pieces
            ]
            inputs = step_inputs([Piece(start, [0] * len(c), sessions[name]["blocks"]) for name, start, c in parts],
                                 max_blocks, write_rows)  # fmt: skip
            q, k, v = (np.zeros((ROWS, dim)) for _ in range(3))
            for rows, (_, _, chunk) in zip(inputs.rows, parts):
                for r, qkv in zip(rows, chunk):
                    q[r], k[r], v[r] = qkv
            got = device.step(inputs, q, k, v)
            for rows, (name, _, chunk) in zip(inputs.rows, parts):
                kv = sessions[name]["kv"]
                kv.extend((t[1], t[2]) for t in chunk)
                keys, values = np.stack([x[0] for x in kv]), np.stack([x[1] for x in kv])
                np.testing.assert_allclose(got[list(rows)], dense_attention(q[list(rows)], keys, values), rtol=1e-12)
            assert np.isnan(got[inputs.live :]).all(), "dead rows attend to nothing"

    run(("a", 0, 7), ("b", 0, 3))  # a prompt longer than a pass's rows for a session: two passes
    run(("a", 7, 5), ("b", 3, 5))  # verify k = 4, a across a block boundary
    run(("a", 9, 5), ("b", 8, 1))  # a rejected after two: back to 9; b accepted all, a bonus
    run(("b", 9, 5), ("a", 14, 5))  # up to position 18, in a's last block


# --- trace capture and replay ----------------------------------------------------------------


class FakeRuntime:
    """Records device calls; refuses allocation during a capture, as a trace cannot hold one."""

    def __init__(self):
        self.log: list[tuple] = []
        self.capturing = False
        self.traces = 0

    def allocate(self, host):
        assert not self.capturing, "allocation inside a trace capture"
        buffer = {"value": host}
        self.log.append(("allocate", id(buffer)))
        return buffer

    def write(self, host, device):
        device["value"] = host
        self.log.append(("write", id(device), host))

    def begin_capture(self):
        self.capturing = True
        self.log.append(("begin",))

    def end_capture(self):
        self.capturing = False
        self.traces += 1
        self.log.append(("end", self.traces))
        return self.traces

    def replay(self, trace):
        self.log.append(("replay", trace))

    def release(self, trace):
        self.log.append(("release", trace))


def test_every_program_compiles_before_the_first_capture_and_replays_reuse_the_buffers():
    runtime = FakeRuntime()
    ran = []

    def program(name):
        def run(buffers):
            ran.append((name, runtime.capturing, buffers["tokens"]["value"]))
            return f"{name}-output"

        return run

    traces = StepTraces(runtime)
    traces.warm_up({"draft": (program("draft"), {"tokens": [0]}), "verify": (program("verify"), {"tokens": [1]})})
    assert [(n, c) for n, c, _ in ran] == [("draft", False), ("verify", False), ("draft", True), ("verify", True)]
    allocated = [entry[1] for entry in runtime.log if entry[0] == "allocate"]
    first_capture = runtime.log.index(("begin",))
    assert all(runtime.log.index(("allocate", a)) < first_capture for a in allocated)

    runtime.log.clear()
    assert traces.run("verify", {"tokens": [5, 6]}) == "verify-output"
    assert traces.run("draft", {}) == "draft-output"  # a self-feeding replay writes nothing
    assert runtime.log[0][0] == "write" and runtime.log[0][1] in allocated and runtime.log[0][2] == [5, 6]
    assert runtime.log[1:] == [("replay", 2), ("replay", 1)]
    assert len(ran) == 4, "a replay runs no Python model code"

    with pytest.raises(KeyError, match="not captured at warm-up"):
        traces.run("prefill", {})
    with pytest.raises(KeyError, match="not buffers of this step"):
        traces.run("draft", {"positions": [0]})
    traces.close()
    assert sorted(e for e in runtime.log if e[0] == "release") == [("release", 1), ("release", 2)]


def test_capture_happens_once_per_device():
    traces = StepTraces(FakeRuntime())
    traces.warm_up({"draft": (lambda b: None, {"x": 0})})
    with pytest.raises(RuntimeError, match="once per device"):
        traces.warm_up({"draft": (lambda b: None, {"x": 0})})


# --- device ownership --------------------------------------------------------------------------


def test_a_process_owns_one_device_and_closes_it_once():
    opened, closed = [], []
    owner = DeviceOwner(1, lambda i: opened.append(i) or f"dev{i}", closed.append)
    assert owner.open() == "dev1"
    with pytest.raises(DeviceUnavailable, match="already owns device 1"):
        DeviceOwner(0, lambda i: f"dev{i}", closed.append).open()
    owner.close()
    owner.close()  # the graceful stop and the exit hook both call it
    assert opened == [1] and closed == ["dev1"]
    second = DeviceOwner(0, lambda i: f"dev{i}", closed.append)  # free again once closed
    assert second.open() == "dev0"
    second.close()


def test_no_chip_becomes_a_one_line_reason():
    fatal = RuntimeError(
        "TT_FATAL @ /project/tt_metal/llrt/tt_cluster.cpp:129: num_chips > 0\ninfo:\n"
        "No chips detected in the cluster\nbacktrace:\n --- _ttnncpp.so(+0xb233e8)"
    )
    assert tt_fatal_reason(fatal) == "No chips detected in the cluster"

    def no_chip(device_id):
        raise fatal

    with pytest.raises(DeviceUnavailable, match="cannot open Tenstorrent device 3: No chips detected in the cluster"):
        DeviceOwner(3, no_chip, lambda d: None).open()
    assert DeviceOwner._owner_in_process is None


# --- weight layout -------------------------------------------------------------------------------


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        family="llama", vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=False, eos_token_ids=(0,),
    )  # fmt: skip
    values.update(overrides)
    return ModelConfig(**values)


def interleaved_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """What rotary_embedding_llama computes, per head: x * cos + (x @ T) * sin."""
    d = x.shape[-1]
    return x * cos + (x @ rotation_matrix(32)[:d, :d]) * sin


def test_interleaved_rope_on_reordered_rows_equals_hf_rope_and_keeps_attention_scores():
    config = tiny_config()
    d, heads = config.head_dim, config.num_heads
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, config.hidden_size))
    wq = rng.standard_normal((heads * d, config.hidden_size))
    wk = rng.standard_normal((heads * d, config.hidden_size))
    cos, sin = (t.double().numpy() for t in rope_tables(config, 5, torch.float64))  # [5, d]
    icos, isin = interleave_rope_tables(cos, sin)

    def hf(w):  # [heads, 5, d]
        per_head = torch.from_numpy(x @ w.T).view(5, heads, d).transpose(0, 1)[None]
        return apply_rope(per_head, torch.from_numpy(cos), torch.from_numpy(sin))[0].numpy()

    def ours(w):
        per_head = (x @ interleave_rope_rows(w, heads).T).reshape(5, heads, d).transpose(1, 0, 2)
        return interleaved_rope(per_head, icos, isin)

    order = np.arange(d).reshape(2, d // 2).T.reshape(-1)  # interleaved index -> HF index
    np.testing.assert_allclose(ours(wq), hf(wq)[..., order], atol=1e-12)
    scores_hf = hf(wq) @ hf(wk).transpose(0, 2, 1)
    scores_ours = ours(wq) @ ours(wk).transpose(0, 2, 1)
    np.testing.assert_allclose(scores_ours, scores_hf, atol=1e-10)


def test_layer_arrays_are_fused_transposed_and_carry_the_qwen_bias():
    config = tiny_config(qkv_bias=True, tie_word_embeddings=False)
    rng = np.random.default_rng(2)
    h, kv, d, hidden, inter = config.num_heads, config.num_kv_heads, config.head_dim, 32, 48
    p = "model.layers.0."
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((16, hidden)),
        "lm_head.weight": rng.standard_normal((16, hidden)),
        "model.norm.weight": rng.standard_normal(hidden),
        f"{p}input_layernorm.weight": rng.standard_normal(hidden),
        f"{p}post_attention_layernorm.weight": rng.standard_normal(hidden),
        f"{p}self_attn.q_proj.weight": rng.standard_normal((h * d, hidden)),
        f"{p}self_attn.k_proj.weight": rng.standard_normal((kv * d, hidden)),
        f"{p}self_attn.v_proj.weight": rng.standard_normal((kv * d, hidden)),
        f"{p}self_attn.q_proj.bias": rng.standard_normal(h * d),
        f"{p}self_attn.k_proj.bias": rng.standard_normal(kv * d),
        f"{p}self_attn.v_proj.bias": rng.standard_normal(kv * d),
        f"{p}self_attn.o_proj.weight": rng.standard_normal((hidden, h * d)),
        f"{p}mlp.gate_proj.weight": rng.standard_normal((inter, hidden)),
        f"{p}mlp.up_proj.weight": rng.standard_normal((inter, hidden)),
        f"{p}mlp.down_proj.weight": rng.standard_normal((hidden, inter)),
    }
    arrays = model_arrays(config, hf)
    x = rng.standard_normal((3, hidden))
    qkv = x @ arrays["layers.0.wqkv"] + arrays["layers.0.bqkv"][0, 0]
    rows = arrays["layers.0.bqkv_rows"]  # the decode step's: one copy per row, no broadcast in a trace
    assert rows.shape == (1, 1, 32, (h + 2 * kv) * d) and (rows == arrays["layers.0.bqkv"]).all()
    v_hf = x @ hf[f"{p}self_attn.v_proj.weight"].T + hf[f"{p}self_attn.v_proj.bias"]
    np.testing.assert_allclose(qkv[:, (h + kv) * d :], v_hf, rtol=1e-5)  # v is not reordered
    q_hf = x @ hf[f"{p}self_attn.q_proj.weight"].T + hf[f"{p}self_attn.q_proj.bias"]
    np.testing.assert_allclose(np.sort(qkv[:, : h * d]), np.sort(q_hf), rtol=1e-5)  # q only reordered
    np.testing.assert_allclose(x @ arrays["layers.0.w_gate"], x @ hf[f"{p}mlp.gate_proj.weight"].T, rtol=1e-5)
    np.testing.assert_allclose(arrays["layers.0.ffn_norm"].reshape(-1), hf[f"{p}post_attention_layernorm.weight"])
    assert arrays["norm"].shape == (1, 1, hidden // 32, 32)
    np.testing.assert_allclose(arrays["lm_head"], hf["lm_head.weight"].T, rtol=1e-6)
    assert arrays["layers.0.wo"].shape == (h * d, hidden) and arrays["layers.0.w_down"].shape == (inter, hidden)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays.values())
    assert not {"bqkv", "bqkv_rows"} & set(layer_arrays(tiny_config(), {**hf}, 0))  # Llama has no bias


def test_the_mask_table_hides_every_key_past_the_query_and_nothing_before():
    table = causal_mask_table(70)
    scores = np.random.default_rng(0).standard_normal((70, 70)) * 10 + table
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    assert (np.triu(weights, 1) == 0).all()  # exp(MASKED) underflows: past the position weighs nothing
    assert (np.tril(table) == 0).all() and np.isfinite(table).all()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=CANDIDATES),
        SamplingParams(temperature=1.3, top_k=5, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=1),
    ],
)
def test_a_rows_top_candidates_give_the_same_processed_distribution_as_the_whole_row(params):
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    top = torch.topk(logits, CANDIDATES)
    shuffled = torch.randperm(CANDIDATES, generator=torch.Generator().manual_seed(1))  # the device may not sort
    rebuilt = logits_from_candidates(top.values[:, shuffled], top.indices[:, shuffled].to(torch.int32), 1000)
    assert rebuilt.shape == (3, 1000) and torch.isinf(rebuilt).sum() == 3 * (1000 - CANDIDATES)
    assert torch.equal(processed_probs(rebuilt, params), processed_probs(logits, params))


def test_candidates_past_the_vocabulary_are_dropped():
    rebuilt = logits_from_candidates(torch.tensor([[2.0, 1.0, 9.0]]), torch.tensor([[0, 5, 70]]), vocab_size=64)
    assert rebuilt.shape == (1, 64)
    assert rebuilt[0, 0] == 2.0 and rebuilt[0, 5] == 1.0 and torch.isinf(rebuilt).sum() == 62


def test_only_a_sampled_request_with_a_small_top_k_reads_candidates():
    assert not samples_from_candidates(SamplingParams())  # greedy: the argmax comes back
    assert not samples_from_candidates(SamplingParams(temperature=1.0))  # no top-k: the whole row
    assert not samples_from_candidates(SamplingParams(temperature=1.0, top_k=CANDIDATES + 1))
    assert samples_from_candidates(SamplingParams(temperature=1.0, top_k=CANDIDATES, top_p=0.5))
