"""`--dtype gguf`: a GGUF file's quantized weights run as shipped (specdec/engine/gguf_weights.py,
cpu_quant_linear.py), on tiny models quantized here the way llama.cpp's files are."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from specdec.engine.base import forward_one
from specdec.engine import cpu_quant_linear
from specdec.engine.cpu_quant_linear import (
    Int4Block,
    Int8Block,
    Int8Rows,
    RowPlan,
    WeightOnlyLinear,
)
from specdec.engine.gguf_weights import unpack_q4_0, unpack_q4_1, unpack_q4_k
from specdec.engine.torch_engine import TorchEngine
from specdec.v1 import generate_pb2
from tests.gguf_files import save_tiny_gguf
from tests.kquants import quantize_q4_k, quantize_q6_k
from tests.servers import start_stack
from tests.tiny import greedy_reference

Q = gguf.GGMLQuantizationType
VOCAB = 48  # a multiple of 16: the int4 kernel's output rows
# llama.cpp's Q4_K_M: Q4_K, with attn_v, ffn_down and the head in Q6_K
Q4_K_M = {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K", "output.weight": "Q6_K"}
# the smaller types of the registered files: Q4_0 and Q4_1 on the int4 kernel, Q5_0 and Q8_0 on int8
MIXED = {"attn_q.weight": "Q4_1", "attn_v.weight": "Q5_0", "ffn_down.weight": "Q8_0", "token_embd.weight": "Q8_0"}
MODELS = {
    "llama-q4_k_m": dict(quant="Q4_K", overrides=Q4_K_M, family="llama"),
    "qwen2-q4_k_m": dict(quant="Q4_K", overrides=Q4_K_M, family="qwen2", tie_word_embeddings=True),
    "llama-mixed": dict(quant="Q4_0", overrides=MIXED, family="llama", tie_word_embeddings=True),
}


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, (rows, cols)).astype(np.float32)


@pytest.mark.parametrize(
    "qtype, pack, unpack",
    [
        (Q.Q4_0, lambda w: gguf.quants.quantize(w, Q.Q4_0), unpack_q4_0),
        (Q.Q4_1, lambda w: gguf.quants.quantize(w, Q.Q4_1), unpack_q4_1),
        (Q.Q4_K, quantize_q4_k, unpack_q4_k),
    ],
)
def test_4_bit_blocks_unpack_to_the_weights_gguf_reads(qtype, pack, unpack):
    raw = pack(weights(32, 512))
    grid = unpack(raw)
    assert grid.q.max() <= 15 and grid.scale.shape == (32, 512 // 32)
    np.testing.assert_array_equal(grid.dequantize(), gguf.quants.dequantize(raw, qtype).reshape(32, 512))


@pytest.mark.parametrize("qtype, pack, step", [(Q.Q4_K, quantize_q4_k, 4 / 15), (Q.Q6_K, quantize_q6_k, 2 / 31)])
def test_the_test_k_quant_writers_are_read_back_within_a_step(qtype, pack, step):
    w = weights(16, 512)
    back = gguf.quants.dequantize(pack(w), qtype).reshape(w.shape)
    assert np.abs(back - w).max() <= step * np.abs(w).max() / 2 * 1.05


def test_int4_block_computes_x_times_the_grid():
    raw = quantize_q4_k(weights(64, 256, seed=1))
    grid = unpack_q4_k(raw)
    x = torch.randn(5, 256).to(torch.bfloat16)
    expected = x.float() @ torch.from_numpy(grid.dequantize()).T
    got = Int4Block(grid)(x).float()
    # only the scale and zero rounded to bfloat16 (and the output): within 1 % of the output's scale
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


def test_int8_block_rounds_each_row_to_its_own_scale():
    w = weights(32, 64, seed=2) * np.linspace(0.1, 3, 32)[:, None]  # rows of very different sizes
    block = Int8Block(w)
    step = np.abs(w).max(axis=1) / 127
    back = block.weight.float().numpy() * block.scale.float().numpy()[:, None]
    assert np.all(np.abs(back - w) <= step[:, None] * 0.51 + np.abs(w) * 2**-8)


def test_row_plan_splits_where_the_kernel_steps_up():
    # one call costs 1 up to 4 rows, then 3: 5 rows go as 4 + 1, 8 as 4 + 4, 3 as one call
    plan = RowPlan.from_times([1.0] * 4 + [3.0] * 12)
    assert plan.calls(3) == [3] and sorted(plan.calls(5)) == [1, 4] and plan.calls(8) == [4, 4]
    assert plan.calls(40) == [40]  # past the timed sizes: one call
    assert all(sum(plan.calls(m)) == m for m in range(1, 17))


def test_split_rows_give_the_same_output_as_one_call():
    grid = unpack_q4_0(gguf.quants.quantize(weights(48, 64, seed=3), Q.Q4_0))
    linear = WeightOnlyLinear.from_parts([grid, weights(32, 64, seed=4)], torch.randn(80))
    x = torch.randn(7, 64).to(torch.bfloat16)
    whole = linear(x)
    linear.plan = RowPlan.from_times([1.0, 1.5, 9, 9, 9, 9, 9])  # 7 rows as 2 + 2 + 2 + 1
    assert linear.plan.calls(7) != [7]
    torch.testing.assert_close(linear(x), whole, rtol=0, atol=0)
    assert [type(b) for b in linear.blocks] == [Int4Block, Int8Block]
    assert linear(x[:0]).shape == (0, 80)  # a pass that wants no logits


def tiny_gguf(path, model: str):
    """One of MODELS written as a GGUF file at path."""
    spec = dict(MODELS[model])
    return save_tiny_gguf(
        path, spec.pop("quant"), overrides=spec.pop("overrides"), vocab_size=VOCAB, hidden_size=256,
        num_heads=4, num_kv_heads=2, init_std=0.3, max_positions=512, **spec,
    )  # fmt: skip


def assert_greedy_speculation_equals_target_alone(loop, quantized, draft, path, k: int) -> None:
    """Greedy speculation over gRPC (draft: an engine on the same file) gives what the quantized
    target alone gives, with some proposals made."""
    stack = start_stack(loop, quantized, draft, str(path))
    try:
        for prompt in ([1, 2, 3], [7, 7, 9, 11, 4, 30, 2]):
            request = generate_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=20, num_draft_tokens=k, ignore_eos=True
            )
            responses = list(stack.generator().Generate(request, timeout=120))
            assert [t for r in responses for t in r.token_ids] == greedy_reference(quantized, prompt, 20)
            assert responses[-1].stats.draft_tokens > 0
    finally:
        stack.stop()


needs_fbgemm = pytest.mark.skipif(not cpu_quant_linear.fbgemm_available(), reason="this torch has no fbgemm")


@needs_fbgemm
def test_int8_rows_are_independent_of_the_rows_beside_them():
    """A row's result is the same bits alone or beside rows of another range (a verify row equals
    the decode of its token), and within 8-bit rounding of the float product."""
    w = weights(80, 64, seed=6)
    layer = Int8Rows(w)
    x = torch.randn(6, 64) * torch.tensor([1.0, 50.0, 0.01, 3.0, 1.0, 7.0])[:, None]
    x = x.to(torch.bfloat16)
    together = layer(x)
    for i in range(6):
        torch.testing.assert_close(layer(x[i : i + 1]), together[i : i + 1], rtol=0, atol=0)
    exact = x.float() @ torch.from_numpy(w).T
    error = ((together.float() - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert error < 3e-2, error


@pytest.fixture
def int8_rows_everywhere(monkeypatch):
    """Every layer's fbgemm copy timed as the faster kernel, so that the engine runs on it."""
    fake = lambda matmul, in_features, rows, repeats: 0.0 if isinstance(matmul, Int8Rows) else 1.0  # noqa: E731
    monkeypatch.setattr(cpu_quant_linear, "_median_seconds", fake)


@needs_fbgemm
@pytest.mark.parametrize("k", [2, 5])
def test_greedy_speculative_on_int8_rows_equals_its_target_alone(loop, tmp_path, int8_rows_everywhere, k):
    """Every layer on fbgemm's copy: logits within twice bfloat16's rounding, and greedy
    speculation exactly its target alone, since rows never depend on their neighbours."""
    path = tiny_gguf(tmp_path / "tiny.gguf", "llama-q4_k_m")
    quantized = TorchEngine.load(str(path), dtype="gguf-int8", max_seq_len=256, max_sessions=8)
    assert quantized.info.dtype == "gguf-int8"
    linears = [m for m in quantized.model.modules() if isinstance(m, WeightOnlyLinear)]
    assert all(m.int8_rows is not None for m in linears)
    dequantized = TorchEngine.load(str(path), dtype="float32", max_seq_len=256, max_sessions=2)
    prompt = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB, 40)]
    bfloat16 = TorchEngine.load(str(path), dtype="bfloat16", max_seq_len=256, max_sessions=1)
    got, rounded, expected = (
        forward_one(e, e.new_session(64), prompt, len(prompt)).logits.float()
        for e in (quantized, bfloat16, dequantized)
    )
    # 8-bit activations cost about twice what bfloat16 ones do (on AVX-512 VNNI: 3.7 against 1.75 at
    # most, on logits of spread 4.8; 34 of 40 argmaxes as float32's, against 36). Without VNNI fbgemm
    # gets 7-bit ones (reduce_range), half as fine: 9.7 against 1.75 on an AVX2-only EPYC.
    allowed = 6 if linears[0].int8_rows.reduce_range else 3
    assert (got - expected).abs().max() <= allowed * (rounded - expected).abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    assert_greedy_speculation_equals_target_alone(loop, quantized, dequantized, path, k)


@pytest.fixture(scope="module", params=list(MODELS))
def gguf_pair(request, tmp_path_factory):
    """(the model loaded as shipped, the same file dequantized to float32), and its GGUF."""
    path = tiny_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", request.param)
    quantized = TorchEngine.load(str(path), dtype="gguf", max_seq_len=256, max_sessions=8)
    dequantized = TorchEngine.load(str(path), dtype="float32", max_seq_len=256, max_sessions=2)
    return quantized, dequantized, path


def test_the_quantized_tensors_are_not_dequantized(gguf_pair):
    quantized, _, path = gguf_pair
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    model = quantized.model
    assert quantized.info.dtype == "gguf"
    linears = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(linears) == 4 * model.config.num_layers + 1  # qkv, o, gate/up, down; the head
    # no float matrix but the embedding table: the linears hold int4 / int8 buffers only
    floats = [n for n, t in model.state_dict().items() if t.dim() == 2 and t.is_floating_point()]
    assert floats == ["model.embed_tokens.weight"]
    layer = model.model.layers[0]
    # 4-bit types as stored on the int4 kernel, the others on int8 rows
    kind = lambda name: Int4Block if types[name] in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else Int8Block  # noqa: E731
    assert [type(b) for b in layer.mlp.gate_up_proj.blocks] == [kind("blk.0.ffn_gate.weight")]
    assert [type(b) for b in layer.mlp.down_proj.blocks] == [kind("blk.0.ffn_down.weight")]
    qkv = [kind(f"blk.0.attn_{x}.weight") for x in "qkv"]
    assert [type(b) for b in layer.self_attn.qkv_proj.blocks] == [k for i, k in enumerate(qkv) if qkv[i - 1 : i] != [k]]


def test_logits_match_the_dequantized_model_to_rounding(gguf_pair):
    """Against float32 on the same file, the quantized path is off by no more than about what
    bfloat16 activations cost the same dequantized weights (the int4 kernel's bfloat16 scales and
    the int8 rows add a rounding each), over a 40-token prompt."""
    quantized, dequantized, path = gguf_pair
    prompt = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB, 40)]
    bfloat16 = TorchEngine.load(str(path), dtype="bfloat16", max_seq_len=256, max_sessions=1)
    logits = []
    for engine in (quantized, bfloat16, dequantized):
        session = engine.new_session(64)
        logits.append(forward_one(engine, session, prompt, len(prompt)).logits.float())
        engine.end_session(session)
    got, rounded, expected = logits
    assert (got - expected).abs().max() <= 2.5 * (rounded - expected).abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_speculative_on_the_quantized_path_equals_its_target_alone(loop, gguf_pair, k):
    """Exact on these models. In bfloat16 a verify block and a one-row decode round apart by a
    step at most, so a near tie (top-2 gap of one bfloat16 step) could flip: the models' logits
    are spread wide enough (init_std 0.3) that these prompts meet none."""
    quantized, dequantized, path = gguf_pair
    assert_greedy_speculation_equals_target_alone(loop, quantized, dequantized, path, k)  # a float32 draft
