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

from . import family
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


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index} is not valid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard files")
    return weight_map


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder, shards in index order."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS), (PYTORCH_BIN_INDEX, PYTORCH_BIN)):
        single = os.path.join(path, single_name)
        if os.path.isfile(single):
            return [single]
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            files = [os.path.join(path, shard) for shard in dict.fromkeys(_read_weight_map(index).values())]
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
    for legacy, name in ((".gamma", ".weight"), (".beta", ".bias")):
        if key.endswith(legacy):
            return key[: -len(legacy)] + name
    return key


def map_checkpoint_keys(
    state: dict[str, torch.Tensor], model_keys: set[str], model_type: str = "bert"
) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's: legacy names, with or without the ``bert.`` prefix, and
    the names of ``model_type``'s family (``roberta.``, ``electra.``, ``distilbert.``, ...: see
    :func:`bertfast.family.bert_state_dict`).

    Two stored names that land on one model key (``bert.X`` and ``X``, or ``gamma`` and
    ``weight``) must hold equal tensors: which one to load would otherwise be a guess.
    """
    state = family.bert_state_dict(state, model_type)
    model_has_prefix = any(k.startswith("bert.") for k in model_keys)
    mapped: dict[str, torch.Tensor] = {}
    stored_as: dict[str, str] = {}
    for stored, tensor in state.items():
        key = normalize_key(stored)
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if model_has_prefix and key not in model_keys and f"bert.{key}" in model_keys:
            key = f"bert.{key}"
        elif not model_has_prefix and key.startswith("bert."):
            key = key[len("bert.") :]
        if key in mapped:
            other = mapped[key]
            if other.shape != tensor.shape or not torch.equal(other, tensor):
                raise CheckpointError(
                    f"the checkpoint holds both {stored_as[key]!r} and {stored!r}, which both load into {key!r}, "
                    "with different values; remove one"
                )
            continue
        mapped[key] = tensor
        stored_as[key] = stored
    return mapped


def _tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys whose tensor is shared with an earlier key (e.g. the MLM decoder) -> that key."""
    seen: dict[int, str] = {}
    tied = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
    return tied


def _check_ties(model: torch.nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Refuse a checkpoint whose tensors differ where the model shares one parameter.

    bertfast's MLM heads always tie the decoder to the word embeddings (one Parameter); a
    checkpoint saved untied would otherwise overwrite the embeddings with its decoder.
    """
    config = getattr(model, "config", None)
    if tied and config is not None and config.extra.get("tie_word_embeddings") is False:
        raise CheckpointError(
            "the checkpoint's config sets tie_word_embeddings=false, but bertfast's masked-LM heads always share "
            f"the decoder with the word embeddings ({', '.join(sorted(tied))}); load it with transformers, or "
            "into a bertfast class without an MLM head (BertModel, the classification heads)"
        )
    for key, source in tied.items():
        if key in state and source in state:
            a, b = state[key], state[source]
            if a.shape != b.shape or not torch.equal(a, b):
                raise CheckpointError(
                    f"the checkpoint's {key!r} differs from {source!r}, but bertfast ties them (one parameter); "
                    "an untied masked-LM decoder cannot be loaded into bertfast's MLM heads"
                )


def load_state_dict_checked(
    model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool, model_type: str = "bert"
) -> LoadingInfo:
    """Copy ``state`` (a checkpoint of ``model_type``'s family) into ``model``, naming every missing,
    unexpected or mis-shaped tensor."""
    model_state = model.state_dict()
    state = map_checkpoint_keys(state, set(model_state), model_type)
    tied = _tied_keys(model)
    _check_ties(model, state, tied)
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


def _encoder_only(state: dict, model_type: str, what: str, class_name: str) -> dict:
    """The embedding and encoder tensors of ``state``; the rest is named in a warning."""
    base = (family.family_of_model_type(model_type) or family.BERT).base_attr
    encoder_prefixes = ("embeddings.", "encoder.", "transformer.")
    kept = {k: t for k, t in state.items() if k.removeprefix(f"{base}.").startswith(encoder_prefixes)}
    head = sorted(k for k in state if k not in kept)
    warnings.warn(
        f"{what}: bertfast.{class_name} loads its encoder only, not its head {head}; bertfast.{class_name}'s own "
        "head starts from its initial values",
        stacklevel=4,
    )
    return kept


def load_pretrained(cls, path, backend="auto", dtype=None, device=None, strict=False):
    path = os.fspath(path)
    config = BertConfig.from_pretrained(path)
    model_type = config.family
    state = read_state_dict(path)
    if cls.__name__ != "BertModel":
        for architecture in config.extra.get("architectures") or ():
            reason = family.foreign_head_reason(architecture)
            if reason is not None:  # its head tensors would land in the wrong head: the encoder alone loads
                state = _encoder_only(state, model_type, f"a {architecture} checkpoint ({reason})", cls.__name__)
    model = cls(config, backend=backend)
    model.loading_info = load_state_dict_checked(model, state, strict, model_type)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def _family_layout(model: torch.nn.Module) -> str:
    """The transformers class whose layout ``model`` saves in (its family's); ``ValueError`` where none has it."""
    config = model.config
    name = family.family_class_name(type(model).__name__, config.family)
    pooler = getattr(model, "pooler", None) is not None
    if name.endswith("Model") and pooler != family.family_of_model_type(config.family).base_pooler:
        raise ValueError(
            f"this bertfast.BertModel {'has' if pooler else 'lacks'} a pooler, but transformers' {name} "
            f"{'has none' if pooler else 'has one'}: it cannot be saved in the {config.family} layout"
        )
    return name


def save_config(model: torch.nn.Module, path) -> None:
    """``path/config.json`` as transformers writes it, in the model's family's layout: the architecture and the
    weights' dtype included."""
    architecture = _family_layout(model)
    os.makedirs(path, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [architecture]
    # The dtype the weights are stored in, as transformers writes it (it reloads in this dtype).
    config.pop("torch_dtype", None)
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def save_pretrained(model: torch.nn.Module, path, state_dict: dict | None = None) -> None:
    """``config.json`` + ``model.safetensors`` in the model's family's layout (a RoBERTa model as
    ``RobertaFor...``: its names and config), which transformers and bertfast load; a tied tensor is stored
    once, under its first name.

    ``state_dict``: the tensors to write under the model's names (default: the model's own).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    save_config(model, path)
    tied = _tied_keys(model)
    # Copies on the CPU: safetensors refuses tensors that share storage (a view in a user's state_dict).
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v for k, v in state.items() if k not in tied}
    state = family.family_state_dict(state, model.config.family, type(model).__name__)
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    save_file(tensors, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
