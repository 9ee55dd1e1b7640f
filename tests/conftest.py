from __future__ import annotations

import pytest
import torch

from specdec.engine.torch_engine import TorchEngine
from tests.servers import Loop, start_stack
from tests.tiny import save_layer_skip_draft, save_tiny_model

VOCAB = 32

# Tiny models gain nothing from intra-op threads, whose spinning starves the gRPC threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def loop():
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Target: 4 layers. Drafts: its first 3 layers (agrees about half the time), an unrelated smaller model
    (rarely agrees), and the target itself (always agrees)."""
    root = tmp_path_factory.mktemp("models")
    target = save_tiny_model(root / "target", vocab_size=VOCAB, hidden_size=32, num_layers=4, init_std=0.5, seed=1)
    return {
        "target": target,
        "layer_skip": save_layer_skip_draft(target, root / "layer_skip", num_layers=3),
        "unrelated": save_tiny_model(
            root / "unrelated", vocab_size=VOCAB, hidden_size=16, num_layers=1, init_std=0.5, seed=2
        ),
        "qwen2": save_tiny_model(
            root / "qwen2", family="qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, init_std=0.5, seed=3
        ),
    }


@pytest.fixture(scope="session")
def engines(model_dirs):
    return {name: TorchEngine.load(path, dtype="float64") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def stack(loop, engines, model_dirs):
    """Orchestrator over the target and its layer-skip draft, float64."""
    stack = start_stack(loop, engines["target"], engines["layer_skip"], str(model_dirs["target"]))
    yield stack
    stack.stop()
