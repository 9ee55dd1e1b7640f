"""The ttnn backend's model and engine, whole, against the torch backend: on the ttnn emulator
(tests/ttnn_emulator.py) everywhere, and on a Tenstorrent chip where one is found.

    pytest tests/tt/test_model.py -m tt_device     (on a TT host: torch, ttnn and the project)

The emulator runs model.py, the weight conversion and its disk cache, the traces and the engine
with numpy ops in float64, so its logits must equal the torch backend's to rounding: that checks
the wiring (weight layouts, heads, RoPE, page tables, positions, cache writes, trace order). On a
chip the same tests check numerics with PCC and top-1 bounds. The chip runs have not happened yet:
this project's machines have none (see the README's TT section). The models are tiny random Llama
and Qwen2 checkpoints with tile-sized dimensions, built in the test.
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest

if importlib.util.find_spec("torch") is None:
    pytest.skip("needs torch (the main environment, or a TT host)", allow_module_level=True)

import torch  # noqa: E402

from specdec.engine.base import Chunk, forward_one  # noqa: E402
from specdec.sampling import Sampler, SamplingParams, wire_probs  # noqa: E402
from tests.tiny import propose, score  # noqa: E402

PCC_MIN, TOP1_MIN = 0.99, 0.99
GREEDY = SamplingParams()


def chips() -> int:
    if importlib.util.find_spec("ttnn") is None:
        return 0
    import ttnn

    try:
        return ttnn.GetNumAvailableDevices()
    except RuntimeError:  # "No chips detected in the cluster"
        return 0


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    from tests.tiny import save_tiny_model

    # Tile-sized: head_dim 64, hidden 256, vocab 1024; one block boundary every 32 positions.
    # Qwen2: q/k/v biases, and tied embeddings as its small models have.
    return save_tiny_model(
        tmp_path_factory.mktemp("tt") / request.param, family=request.param, vocab_size=1024, hidden_size=256,
        num_layers=2, num_heads=4, num_kv_heads=2, init_std=0.05, max_positions=512, seed=7,
        tie_word_embeddings=request.param == "qwen2",
    )  # fmt: skip


HAZARDS_ON = "emulated-hazards"


@contextlib.contextmanager
def device(kind: str):
    """The ttnn module for `kind`: the emulator, with (HAZARDS_ON) or without its hazard modes,
    or a chip's ("chip"; skipped where none is found)."""
    if kind == "chip":
        if chips() == 0:
            pytest.skip("no Tenstorrent chip found")
        import ttnn

        yield ttnn
        return
    from tests import ttnn_emulator

    with ttnn_emulator.installed(ttnn_emulator.HAZARDS if kind == HAZARDS_ON else ()) as ttnn:
        yield ttnn


@contextlib.contextmanager
def loaded(model_dir, cache_dir, reference_dtype: str = "float64", **patches):
    """A TtEngine on the current device, loaded as a service loads it (converted weights cached
    in cache_dir), its start-up modified by `patches` (module under specdec.engine.tt, attribute
    -> replacement); and the torch reference on the same weights."""
    from specdec.engine.torch_engine import TorchEngine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECDEC_CACHE", str(cache_dir))
        from specdec.engine.tt import engine as tt_engine

        for name, value in patches.items():
            patch.setattr(f"specdec.engine.tt.{name}", value)
        # 200: no multiple of the prefill padding (128), as the bench's lengths are not
        tt = tt_engine.TtEngine.load(model_dir, device_id=0, max_seq_len=200, max_draft_tokens=8, max_sessions=2)
        try:
            yield tt, TorchEngine.load(model_dir, dtype=reference_dtype, max_seq_len=256)
        finally:
            tt.close()


@pytest.fixture(scope="module", params=["emulated", HAZARDS_ON, pytest.param("chip", marks=pytest.mark.tt_device)])
def engines(request, model_dir, tmp_path_factory):
    """tt: the TtEngine; torch: the reference on the same weights; exact: whether logits must
    match to rounding (emulated) or to PCC (chip). HAZARDS_ON: the emulator with every hazard
    mode on (a leaky decode attention, a tile-rewriting cache update, no broadcast inside a
    trace, buffers corrupted across replays): the backend's guards must keep every test below
    passing."""
    exact = request.param != "chip"
    with device(request.param), loaded(model_dir, tmp_path_factory.mktemp("cache"),
                                       "float64" if exact else "float32") as (tt, reference):  # fmt: skip
        yield {"tt": tt, "torch": reference, "exact": exact}


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def assert_logits_match(engines, got: torch.Tensor, want: torch.Tensor) -> None:
    if engines["exact"]:
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
    else:
        assert pcc(got, want) >= PCC_MIN
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= TOP1_MIN


def teacher_forced(engine, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits after every token, fed in chunks (prefill first, then verify-sized passes)."""
    session, rows, start = engine.new_session(len(tokens)), [], 0
    for size in chunks:
        rows.append(forward_one(engine, session, tokens[start : start + size], size).logits)
        start += size
    engine.end_session(session)
    return torch.cat(rows).float()


def test_logits_match_the_torch_backend_teacher_forced_across_tiles_and_blocks(engines):
    tokens = torch.randint(1, 1024, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [29, 1, 2, 5, 9, 9, 9, 9, 9, 9, 9]  # passes straddle positions 31/32, 63/64, 95/96
    got = teacher_forced(engines["tt"], tokens, chunks)
    assert_logits_match(engines, got, teacher_forced(engines["torch"], tokens, chunks))


def test_a_prompt_longer_than_one_prefill_tile_matches(engines):
    tokens = torch.randint(1, 1024, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    got = teacher_forced(engines["tt"], tokens, [150])  # padded to 256, logits of the last tiles
    assert_logits_match(engines, got, teacher_forced(engines["torch"], tokens, [150]))


def _verify_inputs(tt, session, start: int, tokens: list[int]):
    from specdec.engine.tt.step_inputs import Piece, step_inputs

    inputs = step_inputs([Piece(start, tokens, session.blocks)], tt.max_blocks, tt.verify_rows)
    return tt.host_inputs(inputs, tt.verify_rows)


def test_trace_replay_equals_the_eager_step(engines):
    tt = engines["tt"]
    session = tt.new_session(64)
    forward_one(tt, session, list(range(1, 20)), 1)
    replayed = tt.ttnn.to_torch(tt.traces.run("verify", _verify_inputs(tt, session, 19, [5, 6, 7]))["logits"])
    buffers = {k: tt.ttnn.to_device(v, tt.owner.device) for k, v in _verify_inputs(tt, session, 19, [5, 6, 7]).items()}
    eager = tt.ttnn.to_torch(tt.model.step(buffers, tt.verify_rows)["logits"])
    torch.testing.assert_close(replayed[..., :3, :], eager[..., :3, :])
    tt.end_session(session)


def test_candidates_are_the_top_of_the_logits_row_at_their_own_ids(engines):
    from specdec.engine.tt.candidates import CANDIDATES

    tt = engines["tt"]
    session = tt.new_session(64)
    forward_one(tt, session, list(range(1, 20)), 1)
    outputs = tt.traces.run("verify_candidates", _verify_inputs(tt, session, 19, [5, 6, 7]))
    logits, rebuilt = tt._logits(outputs)[:3], tt._candidates(outputs)[:3]
    for row, full in zip(rebuilt, logits):
        kept = torch.isfinite(row)
        assert kept.sum() == CANDIDATES
        assert torch.equal(row[kept], full[kept])  # each value sits at its own token id
        assert row[kept].min() >= torch.topk(full, CANDIDATES).values.min()  # and they are the top ones
    tt.end_session(session)


def test_a_pass_mixing_sessions_gives_each_what_a_pass_of_its_own_gives(engines):
    """Several sessions' rows in the same replays (verify blocks straddling tiles and blocks, a
    single decode row, a chunk longer than a session's share of a replay), against each session
    alone; then draft-shaped replays of one row per session. Still only the warm-up traces."""
    tt = engines["tt"]
    traces = len(tt.owner.device.traces)
    rng = torch.Generator().manual_seed(2)
    histories = [torch.randint(1, 1024, (n,), generator=rng).tolist() for n in (29, 62, 5)]
    new = [torch.randint(1, 1024, (n,), generator=rng).tolist() for n in (5, 12, 1)]
    together, alone = ([tt.new_session(96) for _ in histories] for _ in range(2))
    for sessions in (together, alone):
        for s, history in zip(sessions, histories):
            forward_one(tt, s, history, 1)
    mixed = tt.run([Chunk(s, t, len(t), SamplingParams(temperature=1.0)) for s, t in zip(together, new)])
    for s, t, got in zip(alone, new, mixed):
        assert_logits_match(engines, got.logits, forward_one(tt, s, t, len(t)).logits)
    drafted = tt.run([Chunk(s, [7], 1, GREEDY) for s in together])  # one row each: the draft trace
    assert [r.argmax for r in drafted] == [forward_one(tt, s, [7], 1, GREEDY).argmax for s in alone]
    assert len(tt.owner.device.traces) == traces
    for s in together + alone:
        tt.end_session(s)


def test_proposals_equal_what_one_pass_per_token_on_the_torch_backend_gives(engines):
    tt, ref = engines["tt"], engines["torch"]
    sessions = tt.new_session(128), ref.new_session(128)
    for start, tokens, k in [(0, list(range(7, 40)), 6), (35, [3], 8), (36, [9, 4], 3)]:
        got, want = (propose(e, s, start, tokens, k, Sampler(GREEDY))[0] for e, s in zip((tt, ref), sessions))
        if engines["exact"]:
            assert got == want
        assert sessions[0].length == sessions[1].length
    for e, s in zip((tt, ref), sessions):
        e.end_session(s)


def test_sampled_scores_with_a_small_top_k_match_the_torch_backend(engines):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1)
    tokens = list(range(40, 90))
    sessions = {name: engines[name].new_session(64) for name in ("tt", "torch")}
    for name in ("tt", "torch"):
        score(engines[name], sessions[name], 0, tokens[:40], 1)
    got, want = (
        wire_probs(score(engines[n], sessions[n], 40, tokens[40:], 10, params).scored_logits(), params).float()
        for n in ("tt", "torch")
    )
    if engines["exact"]:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # float16 on the wire
    else:
        assert (got - want).abs().sum(-1).max() < 0.1  # total variation, bfloat16 logits
    engines["tt"].end_session(sessions["tt"])


def test_rollback_then_continue_equals_a_fresh_run(engines):
    tt = engines["tt"]
    prompt = list(range(3, 40))
    rolled = tt.new_session(128)
    score(tt, rolled, 0, prompt, 1)
    score(tt, rolled, len(prompt), [9, 9, 9, 9, 9], 5)  # a rejected block
    after_rollback = score(tt, rolled, len(prompt), [11, 12, 13], 3).argmax
    fresh = tt.new_session(128)
    score(tt, fresh, 0, prompt, 1)
    assert score(tt, fresh, len(prompt), [11, 12, 13], 3).argmax == after_rollback
    for s in (rolled, fresh):
        tt.end_session(s)


def test_speculative_greedy_over_grpc_equals_the_ttnn_target_alone(engines, model_dir):
    """Target alone goes through the same verify trace (k = 0: one live row), so equality is exact
    on the device, not only up to bfloat16 near-ties."""
    from specdec.v1 import generate_pb2
    from tests.servers import Loop, start_stack

    loop = Loop()
    draft = engines["torch"]  # a CPU draft: one chip suffices for this test
    try:
        alone = start_stack(loop, engines["tt"], None, str(model_dir))
        spec = start_stack(loop, engines["tt"], draft, str(model_dir))
        for prompt in ([1], list(range(5, 45))):
            outputs = []
            for stack, k in ((alone, 0), (spec, 4)):
                request = generate_pb2.GenerateRequest(
                    prompt_token_ids=prompt, max_tokens=32, num_draft_tokens=k, ignore_eos=True
                )
                outputs.append([t for r in stack.generator().Generate(request, timeout=300) for t in r.token_ids])
            assert outputs[0] == outputs[1]
        alone.stop()
        spec.stop()
    finally:
        loop.close()
