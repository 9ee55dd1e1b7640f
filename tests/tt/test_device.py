"""The ttnn backend on a Tenstorrent chip. Marked tt_device; each test skips unless ttnn and torch
import and a chip answers, so they run by themselves on a TT host:

    pytest tests/tt/test_device.py -m tt_device     (an environment with torch, ttnn and the project)

None of these has run yet: this project's machines have no chip (see the README's TT section).
The model is a tiny random Llama with tile-sized dimensions, built in the test.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.tt_device

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("ttnn") is None:
    pytest.skip("needs torch and ttnn in one environment (a TT host)", allow_module_level=True)

import torch  # noqa: E402

PCC_MIN, TOP1_MIN = 0.99, 0.99


def chips() -> int:
    import ttnn

    try:
        return ttnn.GetNumAvailableDevices()
    except RuntimeError:  # "No chips detected in the cluster"
        return 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.tiny import save_tiny_model

    if chips() == 0:
        pytest.skip("no Tenstorrent chip found")
    # Tile-sized: head_dim 64, hidden 256, vocab 1024; one block boundary every 32 positions.
    return save_tiny_model(
        tmp_path_factory.mktemp("tt") / "llama", vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, init_std=0.05, max_positions=512, seed=7,
    )  # fmt: skip


@pytest.fixture(scope="module")
def engines(model_dir):
    from specdec.engine.torch_engine import TorchEngine
    from specdec.engine.tt.engine import TtEngine

    tt = TtEngine.load(model_dir, device_id=0, max_seq_len=256, max_draft_tokens=8, max_sessions=2)
    yield {"tt": tt, "torch": TorchEngine.load(model_dir, dtype="float32", max_seq_len=256)}
    tt.close()


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def teacher_forced(engine, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits after every token, fed in chunks (prefill first, then verify-sized passes)."""
    session, rows, start = engine.new_session(len(tokens)), [], 0
    for size in chunks:
        rows.append(engine.forward(session, tokens[start : start + size], size))
        start += size
    engine.end_session(session)
    return torch.cat(rows).float()


def test_logits_match_the_torch_backend_teacher_forced_across_tiles_and_blocks(engines):
    tokens = torch.randint(1, 1024, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [29, 1, 2, 5, 9, 9, 9, 9, 9, 9, 9]  # passes straddle positions 31/32, 63/64, 95/96
    got = teacher_forced(engines["tt"], tokens, chunks)
    want = teacher_forced(engines["torch"], tokens, chunks)
    assert pcc(got, want) >= PCC_MIN
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= TOP1_MIN


def test_trace_replay_equals_the_eager_step(engines):
    from specdec.engine.tt.host_tensors import step_host_tensors
    from specdec.engine.tt.step_inputs import step_inputs

    tt = engines["tt"]
    session = tt.new_session(64)
    tt.forward(session, list(range(1, 20)), 1)
    inputs = step_inputs(19, [5, 6, 7], session.blocks, tt.max_blocks, tt.verify_rows)
    replayed = tt.ttnn.to_torch(tt.traces.run("verify", step_host_tensors(tt.ttnn, inputs, tt.verify_rows))["logits"])
    buffers = {
        k: tt.ttnn.to_device(v, tt.owner.device) for k, v in step_host_tensors(tt.ttnn, inputs, tt.verify_rows).items()
    }
    eager = tt.ttnn.to_torch(tt.model.step(buffers, tt.verify_rows, feed_back=False)["logits"])
    torch.testing.assert_close(replayed[..., :3, :], eager[..., :3, :])
    tt.end_session(session)


def test_rollback_then_continue_equals_a_fresh_run(engines):
    tt = engines["tt"]
    prompt = list(range(3, 40))
    rolled = tt.new_session(128)
    tt.score(rolled, 0, prompt, 1, _greedy())
    tt.score(rolled, len(prompt), [9, 9, 9, 9, 9], 5, _greedy())  # a rejected block
    after_rollback = tt.score(rolled, len(prompt), [11, 12, 13], 3, _greedy()).argmax_token_ids
    fresh = tt.new_session(128)
    tt.score(fresh, 0, prompt, 1, _greedy())
    assert tt.score(fresh, len(prompt), [11, 12, 13], 3, _greedy()).argmax_token_ids == after_rollback
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


def _greedy():
    from specdec.sampling import SamplingParams

    return SamplingParams()
