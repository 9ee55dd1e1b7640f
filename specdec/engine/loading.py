"""Finding a model on disk: a Hugging Face directory (config.json + safetensors) or a GGUF file.

A GGUF file is dequantized once by transformers (slow: ~30 s for 135M, minutes for 1.5B) and
cached as a float32 safetensors directory next to the other cached models; later starts load
that directory directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where fetched and converted models live: $SPECDEC_CACHE, else ~/.cache/specdec."""
    return Path(os.environ.get("SPECDEC_CACHE") or Path.home() / ".cache" / "specdec")


def resolve_model_dir(model: str | Path) -> Path:
    """A registered model name, an HF directory, or a GGUF file -> an HF directory on disk."""
    from specdec import models  # the registry of default models

    if isinstance(model, str) and model in models.REGISTRY:
        return models.installed_dir(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_dir(path)
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a registered name ({', '.join(models.REGISTRY)}), "
        "a directory with config.json, nor a .gguf file"
    )


def resolve_tokenizer_dir(model: str | Path) -> Path:
    """Like resolve_model_dir, but a .gguf file gives its metadata only: a tokenizer needs no weights."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_metadata_dir(path)
    return resolve_model_dir(model)


def resolve_gguf_file(model: str | Path) -> tuple[Path, Path]:
    """For `--dtype gguf`: a registered model name or a .gguf file -> (the GGUF file, a directory
    with its config.json and tokenizer). A .gguf file's directory holds no weights: only its
    metadata is converted (seconds), never its tensors."""
    from specdec import models

    if isinstance(model, str) and model in models.REGISTRY:
        model_dir = models.installed_dir(model)
        gguf_file = model_dir / models.GGUF_FILE
        if not gguf_file.is_file():
            raise FileNotFoundError(f"{gguf_file} is missing; run `python -m specdec.models fetch {model}` again")
        return gguf_file, model_dir
    path = Path(model).expanduser()
    if not (path.is_file() and path.suffix == ".gguf"):
        raise FileNotFoundError(f"--dtype gguf needs a .gguf file or a registered model name, not {str(model)!r}")
    return path, gguf_metadata_dir(path)


def _converted_dir(gguf_path: Path, suffix: str = "") -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{gguf_path.stem}-{key}{suffix}"


def gguf_metadata_dir(gguf_path: Path) -> Path:
    """A directory with the GGUF file's config.json and tokenizer, no weights (cached)."""
    gguf_path = gguf_path.resolve()

    def convert(partial: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(partial)
        AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(partial)  # last

    return build_once(_converted_dir(gguf_path, "-metadata"), convert)


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantizes a GGUF file into a float32 safetensors directory (cached; reused if present)."""
    gguf_path = gguf_path.resolve()
    out_dir = out_dir or _converted_dir(gguf_path)

    def convert(partial: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s into %s (once)", gguf_path, out_dir)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # save_pretrained refuses a model still marked as quantized; the weights are plain float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)

    return build_once(out_dir, convert)


def build_once(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """out_dir, built by build(partial) unless it exists (its config.json is written last by
    save_pretrained). Processes building the same directory at once take turns on a lock: one
    builds, the others wait and reuse it. Each builds into a folder of its own that is renamed
    into place whole, so an interrupted build never looks finished."""
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, however this process ends
        if (out_dir / "config.json").is_file():
            return out_dir  # built by another process while this one waited
        partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            build(partial)
            shutil.rmtree(out_dir, ignore_errors=True)  # a leftover without config.json
            partial.rename(out_dir)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def load_state_dict(model_dir: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Reads every tensor, cast to dtype on the device, one tensor at a time so that a model is
    never held twice in memory."""
    state = {}
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return state
