"""Loading local Hugging Face-format checkpoints into bertfast models.

Never touches the network, and never unpickles code: ``.bin`` files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch

from .config import BertConfig

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"

# Buffers some checkpoints carry that the model rebuilds itself.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model (names the offending tensors)."""


@dataclasses.dataclass
class LoadingInfo:
    missing_keys: list[str]
    unexpected_keys: list[str]
    tied_keys: list[str]


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder, shards in index order."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS), (PYTORCH_BIN_INDEX, PYTORCH_BIN)):
        single = os.path.join(path, single_name)
        if os.path.isfile(single):
            return [single]
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
            files = [os.path.join(path, shard) for shard in shards]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"shards listed in {index_name} are missing: {missing}")
            return files
    raise FileNotFoundError(
        f"no weights in {path!r}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} or {PYTORCH_BIN_INDEX}"
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, on the CPU, names as stored."""
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(file, device="cpu"))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def normalize_key(key: str) -> str:
    """Legacy TF-era names: ``LayerNorm.gamma/beta`` -> ``LayerNorm.weight/bias``."""
    if key.endswith(".gamma"):
        return key[: -len(".gamma")] + ".weight"
    if key.endswith(".beta"):
        return key[: -len(".beta")] + ".bias"
    return key


def map_checkpoint_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's: legacy names, with or without the ``bert.`` prefix."""
    model_has_prefix = any(k.startswith("bert.") for k in model_keys)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = normalize_key(key)
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if model_has_prefix and key not in model_keys and f"bert.{key}" in model_keys:
            key = f"bert.{key}"
        elif not model_has_prefix and key.startswith("bert."):
            key = key[len("bert.") :]
        mapped[key] = tensor
    return mapped


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys whose tensor is shared with an earlier key (e.g. the MLM decoder)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        else:
            seen[id(tensor)] = name
    return tied


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool) -> LoadingInfo:
    """Copy ``state`` into ``model``, naming every missing, unexpected or mis-shaped tensor."""
    model_state = model.state_dict()
    state = map_checkpoint_keys(state, set(model_state))
    tied = _tied_keys(model)
    missing = sorted(k for k in model_state if k not in state and k not in tied)
    unexpected = sorted(k for k in state if k not in model_state)
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in state
        if k in model_state and state[k].shape != model_state[k].shape
    ]
    if misshaped:
        raise CheckpointError("tensors with the wrong shape: " + "; ".join(misshaped))
    # Embeddings and encoder layers must come from the checkpoint; a pooler or a task head
    # may be new (fine-tuning starts that way), as in Hugging Face.
    missing_encoder = [k for k in missing if k.removeprefix("bert.").startswith(("embeddings.", "encoder."))]
    if missing_encoder:
        raise CheckpointError(f"the checkpoint lacks encoder weights: {missing_encoder}")
    if strict and (missing or unexpected):
        raise CheckpointError(f"strict loading: missing {missing}, unexpected {unexpected}")
    if missing:
        warnings.warn(f"weights not in the checkpoint, left at their initial values: {missing}", stacklevel=3)
    if unexpected:
        warnings.warn(f"checkpoint tensors the model does not use, ignored: {unexpected}", stacklevel=3)
    with torch.no_grad():
        for key, tensor in state.items():
            if key in model_state:
                model_state[key].copy_(tensor)
    return LoadingInfo(missing_keys=missing, unexpected_keys=unexpected, tied_keys=sorted(tied))


def load_pretrained(cls, path, backend="auto", dtype=None, device=None, strict=False):
    path = os.fspath(path)
    config = BertConfig.from_pretrained(path)
    state = read_state_dict(path)
    model = cls(config, backend=backend)
    info = load_state_dict_checked(model, state, strict)
    model.loading_info = info
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def save_pretrained(model: torch.nn.Module, path) -> None:
    """``config.json`` + ``model.safetensors``; a tied tensor is stored once, under its first name."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tied = _tied_keys(model)
    # Copies: safetensors refuses tensors that share storage (the QKV parameters are laid out back to back).
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
