"""Finding a model on disk: a Hugging Face directory (config.json + safetensors) or a GGUF file.

A GGUF file is dequantized once by transformers (slow: ~30 s for 135M, minutes for 1.5B) and
cached as a float32 safetensors directory next to the other cached models; later starts load
that directory directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

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


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantizes a GGUF file into a float32 safetensors directory (cached; reused if present)."""
    gguf_path = gguf_path.resolve()
    if out_dir is None:
        stat = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        out_dir = cache_root() / "converted" / f"{gguf_path.stem}-{key}"
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf_path, out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a model still marked as quantized; the weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    partial.rename(out_dir)  # atomic: an interrupted conversion never looks finished
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
