"""The chip's known departures from ttnn's documented semantics (specdec/engine/tt/hazards.py), on
the emulator's hazard modes (tests/ttnn_emulator.py) and, where one is found, on a chip.

Each guard is shown needed: with its hazard mode on and the guard taken away, the backend scores
wrong tokens (or the emulator refuses); with the guard, it matches the torch backend exactly.
test_model.py runs every model test with all hazard modes on as well.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest

if importlib.util.find_spec("torch") is None:
    pytest.skip("needs torch (the main environment, or a TT host)", allow_module_level=True)

import torch  # noqa: E402

from specdec.engine.base import forward_one  # noqa: E402
from tests.tt import test_model  # noqa: E402
from tests.tt.test_model import HAZARDS_ON, device, loaded, teacher_forced  # noqa: E402

model_dir = test_model.model_dir  # the fixture: the tiny Llama and Qwen2 checkpoints

TOKENS = torch.randint(1, 1024, (70,), generator=torch.Generator().manual_seed(3)).tolist()
CHUNKS = [29, 5, 9, 9, 9, 9]  # verify-shaped passes straddling positions 31/32 and 63/64


def causal_only(ttnn, device, model, mask_table, max_blocks):
    """The leak guard taken away: the kernel's causal mask whatever the self-test finds."""
    model.mask_table = None
    return "causal"


def matches(tt, reference, tokens=TOKENS, chunks=CHUNKS) -> bool:
    got, want = (teacher_forced(e, tokens, chunks).double() for e in (tt, reference))
    return torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# --- 1. decode attention past cur_pos ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["emulated", HAZARDS_ON, pytest.param("chip", marks=pytest.mark.tt_device)])
def test_the_start_up_self_test_logs_whether_attention_leaks_and_the_path_it_takes(kind, model_dir, tmp_path, caplog):
    with device(kind), caplog.at_level(logging.INFO, logger="specdec.engine.tt.hazards"):
        with loaded(model_dir, tmp_path) as (tt, reference):
            assert matches(tt, reference) or kind == "chip"
            path = "masked" if tt.model.masked else "causal"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode attention self-test")]
    assert f"using the {path} path" in line
    if kind != "chip":  # the emulator's kernel leaks exactly when its hazard mode says so
        assert path == ("masked" if kind == HAZARDS_ON else "causal")
        assert ("LEAKS past cur_pos" in line) == (kind == HAZARDS_ON)


@pytest.mark.parametrize("kind", ["emulated", HAZARDS_ON, pytest.param("chip", marks=pytest.mark.tt_device)])
def test_the_leak_check_sees_the_kernel_leak_and_the_masked_attention_not(kind, model_dir, tmp_path):
    from specdec.engine.tt.hazards import check_decode_attention

    with device(kind) as ttnn, loaded(model_dir, tmp_path) as (tt, _):
        model, device_ = tt.model, tt.owner.device
        masked_table = model.mask_table
        if masked_table is None:
            from specdec.engine.tt.device_weights import device_mask_table

            masked_table = device_mask_table(ttnn, device_, tt.max_blocks * 32)
        saved, model.mask_table = model.mask_table, masked_table
        causal, masked = (check_decode_attention(ttnn, device_, model, tt.max_blocks, masked=m) for m in (False, True))
        model.mask_table = saved
    assert masked.ok  # the explicit mask holds whatever the kernel does with its causal mask
    if kind != "chip":
        assert causal.ok == (kind == "emulated")
        if kind == HAZARDS_ON:
            assert causal.control < 1e-6 < 1 < causal.leakable  # leaks where there is something past the position


def test_without_its_mask_a_leaky_kernel_verifies_wrong_tokens(model_dir, tmp_path):
    with device(HAZARDS_ON), loaded(model_dir, tmp_path, **{"engine.self_test": causal_only}) as (tt, reference):
        assert not tt.model.masked
        assert not matches(tt, reference)


def test_a_session_on_blocks_another_returned_sees_nothing_of_it(model_dir, tmp_path):
    """B borrows the blocks A wrote (with the leaky kernel, A's KV sits past B's positions in
    them): B's logits equal a fresh reference's with the mask, and differ without it."""
    for guarded in (True, False):
        patches = {} if guarded else {"engine.self_test": causal_only}
        with device(HAZARDS_ON), loaded(model_dir, tmp_path / str(guarded), **patches) as (tt, reference):
            a = tt.new_session(96)
            forward_one(tt, a, list(range(500, 590)), 1)
            a_blocks = list(a.blocks)
            tt.end_session(a)
            b = tt.new_session(96)
            assert set(b.blocks) & set(a_blocks)
            tokens, chunks = TOKENS[:40], [3, 9, 9, 9, 9, 1]  # a short prompt: decodes into A's blocks
            got = torch.cat([forward_one(tt, b, tokens[s : s + n], n).logits for s, n in _starts(chunks)])
            tt.end_session(b)
            want = teacher_forced(reference, tokens, chunks).double()
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5) == guarded


def _starts(chunks):
    start = 0
    for n in chunks:
        yield start, n
        start += n


# --- 2. a bias inside a trace ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["emulated", HAZARDS_ON, pytest.param("chip", marks=pytest.mark.tt_device)])
def test_a_bias_expanded_to_the_rows_holds_inside_a_trace(kind):
    from specdec.engine.tt.hazards import TOLERANCE, check_bias_in_trace

    with device(kind) as ttnn:
        dev = ttnn.open_device(device_id=0, trace_region_size=1 << 20)
        try:
            errors = check_bias_in_trace(ttnn, dev)
        finally:
            ttnn.close_device(dev)
    assert errors["expanded add"] < TOLERANCE
    if kind != "chip":
        assert (errors["broadcast bias="] < TOLERANCE) == (kind == "emulated")


def test_without_the_expanded_bias_a_trace_without_broadcast_scores_wrong(model_dir, tmp_path):
    """Qwen2 (q/k/v biases) with the decode bias left one row, as linear's bias= would take it:
    right where a trace broadcasts, wrong where it does not."""
    from specdec.engine.tt import weights

    if "qwen2" not in str(model_dir):
        pytest.skip("Llama has no attention bias")

    def one_row_bias(config, hf, i):
        arrays = weights_layer_arrays(config, hf, i)
        arrays["bqkv_rows"] = arrays["bqkv"]
        return arrays

    weights_layer_arrays = weights.layer_arrays
    for kind in ("emulated", HAZARDS_ON):
        with device(kind), loaded(model_dir, tmp_path / kind, **{"weights.layer_arrays": one_row_bias}) as engines:
            assert matches(*engines) == (kind == "emulated")


# --- 3. two rows of one tile in one KV update ------------------------------------------------------


def test_without_one_update_per_row_a_tile_rewriting_cache_loses_writes(model_dir, tmp_path):
    """A verify block's rows written in one call (the step's draft form, write_rows = 1): right
    where the cache update writes rows, wrong where it rewrites tiles; one call per row is right
    on both."""
    from specdec.engine.tt.step_inputs import Piece, step_inputs

    for kind in ("emulated", HAZARDS_ON):
        with device(kind), loaded(model_dir, tmp_path / kind) as (tt, reference):
            prompt, block = TOKENS[:20], TOKENS[20:29]
            want = teacher_forced(reference, prompt + block, [20, 9])[-9:].double()
            for write_rows, right in ((tt.verify_rows, True), (1, kind == "emulated")):
                session = tt.new_session(64)
                forward_one(tt, session, prompt, 1)
                inputs = step_inputs([Piece(20, block, session.blocks)], tt.max_blocks, tt.verify_rows)
                host = tt.host_inputs(inputs, tt.verify_rows)
                buffers = {k: tt.ttnn.to_device(v, tt.owner.device) for k, v in host.items()}
                got = tt.ttnn.to_torch(tt.model.step(buffers, write_rows)["logits"])[0, 0, :9, :1024].double()
                tt.end_session(session)
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) == right


def test_a_verify_pass_costs_two_updates_per_row_per_layer_and_the_mask_two_ops(model_dir, tmp_path):
    """Ops per captured pass on the emulator: the verify trace has 2 x layers x (verify_rows - 1)
    more KV updates than the draft trace; the masked path adds an embedding and a reshape."""
    counts = {}
    for kind in ("emulated", HAZARDS_ON):
        with device(kind), loaded(model_dir, tmp_path / kind) as (tt, _):
            counts[kind] = {name: len(tt.owner.device.traces[trace]) for name, trace in tt.traces.captured.items()}
            layers, verify_rows = tt.model.config.num_layers, tt.verify_rows
    for kind in counts:
        assert counts[kind]["verify"] - counts[kind]["draft"] == 2 * layers * (verify_rows - 1)
    assert {name: counts[HAZARDS_ON][name] - counts["emulated"][name] for name in counts["emulated"]} == {
        name: 2 for name in counts["emulated"]
    }


# --- 4. buffers across replays ---------------------------------------------------------------------------


def test_the_emulator_refuses_a_buffer_kept_across_a_replay_and_outputs_read_after_another(model_dir, tmp_path):
    with device(HAZARDS_ON) as ttnn, loaded(model_dir, tmp_path) as (tt, _):
        session = tt.new_session(64)
        forward_one(tt, session, list(range(1, 20)), 1)
        inputs = _verify_like(tt, session)
        kept = ttnn.to_device(inputs["positions"], tt.owner.device)  # allocated after capture, kept
        verify = tt.traces.run("verify", inputs)
        ttnn.to_torch(verify["logits"])  # read before the next replay: fine
        draft = tt.traces.run("draft", {k: v for k, v in inputs.items() if not k.startswith("write_positions")})
        ttnn.to_torch(draft["argmax"])
        with pytest.raises(AssertionError, match="output read after trace"):
            ttnn.to_torch(verify["logits"])
        with pytest.raises(AssertionError, match="allocated while a trace existed"):
            ttnn.to_torch(kept)
        tt.end_session(session)


def _verify_like(tt, session):
    from specdec.engine.tt.step_inputs import Piece, step_inputs

    inputs = step_inputs([Piece(19, [5], session.blocks)], tt.max_blocks, tt.verify_rows)
    return tt.host_inputs(inputs, tt.verify_rows)
