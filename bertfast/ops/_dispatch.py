"""Choosing a backend for one op call.

Every backend is a module registered in ``BACKENDS`` (name -> import path).  A
backend module provides:

- ``availability() -> str | None``: ``None`` when it can run at all here, else why not
  (missing package, extension not built, ...).  Called once and cached.
- ``unsupported(op, *tensors, **meta) -> str | None``: ``None`` when it can run this op
  on these inputs, else why not (device, dtype, head size, ...).
- one function per op it implements, named like the op.
- optional capability flags, ``False`` when absent: ``SUPPORTS_ATTENTION_DROPOUT``
  (``attention``/``attention_varlen`` with ``dropout_p > 0``) and ``SUPPORTS_HIDDEN_DROPOUT``
  (``layer_norm`` with ``dropout_p > 0``).  The dispatcher checks them itself (``meta["dropout_p"]``),
  so a backend without the flag is never called with a ``dropout_p`` argument.

``backend=None`` / ``"auto"`` tries ``AUTO_ORDER[device_type]`` in order and takes the
first backend that can run the call; :func:`explain` tells what each candidate said.
An explicit backend that cannot run raises :class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailable

BACKENDS = {
    "reference": "bertfast.ops.reference",
    "triton": "bertfast.ops.triton_backend",
    "ext": "bertfast.ops.ext_backend",
}

# Best first.  On the CPU, PyTorch's own kernels (the reference path) are the fastest
# honest choice; the Triton interpreter and the extension's CPU kernels are for testing.
AUTO_ORDER = {
    "cuda": ("triton", "ext", "reference"),
    "cpu": ("reference",),
}

OPS = (
    "layer_norm",
    "bias_gelu",
    "attention",
    "attention_varlen",
    "embedding_layer_norm",
    "mean_pool",
    "quantize_rows",
    "layer_norm_fp8",
    "bias_gelu_fp8",
)

# op -> (capability flag a backend must set to run it with dropout_p > 0, what the dropout is)
_DROPOUT_CAPABILITY = {
    "attention": ("SUPPORTS_ATTENTION_DROPOUT", "attention-probability dropout"),
    "attention_varlen": ("SUPPORTS_ATTENTION_DROPOUT", "attention-probability dropout"),
    "attention_qkv": ("SUPPORTS_ATTENTION_DROPOUT", "attention-probability dropout"),
    "attention_varlen_qkv": ("SUPPORTS_ATTENTION_DROPOUT", "attention-probability dropout"),
    "layer_norm": ("SUPPORTS_HIDDEN_DROPOUT", "hidden dropout fused into layer_norm"),
}


def validate_backend_name(name: str | None) -> str:
    """Return the canonical backend name, raising ValueError for an unknown one."""
    if name is None:
        return "auto"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    return name


def check_backend(name: str | None) -> str:
    """Validate a model's backend name; an explicit backend must be able to run here at all."""
    name = validate_backend_name(name)
    if name != "auto":
        reason = backend_availability(name)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return name


_LOADED: dict[str, tuple[object | None, str | None]] = {}


def _import(name: str):
    """Import a backend module; returns (module or None, reason it is unavailable or None)."""
    try:
        module = importlib.import_module(BACKENDS[name])
    except Exception as exc:  # an import failure is a reason, reported to the user
        return None, f"import of {BACKENDS[name]} failed: {type(exc).__name__}: {exc}"
    reason = module.availability()
    return (module if reason is None else None), reason


def _load(name: str):
    # A plain dict (not functools.cache) so torch.compile traces the lookup; the first
    # load of every backend happens eagerly, in load_backends().
    if name not in _LOADED:
        _LOADED[name] = _import(name)
    return _LOADED[name]


def load_backends() -> None:
    """Import every backend and check its availability once (outside any compiled region)."""
    for name in BACKENDS:
        _load(name)


def backend_availability(name: str) -> str | None:
    """``None`` if backend ``name`` can run on this machine at all, else the reason."""
    return _load(validate_backend_name(name))[1]


def backend_capabilities(name: str) -> dict[str, list[str]]:
    """What backend ``name`` declares, whether or not it can run here: ``{"ops": [...], "dropout": [...]}``.

    ``dropout`` lists the ops it runs with ``dropout_p > 0``.  Empty lists when its module
    does not import (:func:`backend_availability` says why).
    """
    try:
        module = importlib.import_module(BACKENDS[validate_backend_name(name)])
    except Exception:
        return {"ops": [], "dropout": []}
    implemented = [op for op in OPS if hasattr(module, op)]
    dropout = [
        op for op in implemented if op in _DROPOUT_CAPABILITY and getattr(module, _DROPOUT_CAPABILITY[op][0], False)
    ]
    return {"ops": implemented, "dropout": dropout}


def _candidate_reason(name: str, op: str, tensors, meta) -> tuple[object | None, str | None]:
    module, reason = _load(name)
    if module is None:
        return None, reason
    if not hasattr(module, op):
        return None, f"backend {name!r} does not implement {op}"
    if meta.get("dropout_p", 0.0) > 0.0:
        flag, what = _DROPOUT_CAPABILITY.get(op, (None, f"dropout in {op}"))
        if flag is None or not getattr(module, flag, False):
            return None, f"backend {name!r} has no {what}"
    try:
        reason = module.unsupported(op, *tensors, **meta)
    except Exception as exc:  # e.g. a kernel module that fails to import: a reason, not a crash
        reason = f"{type(exc).__name__}: {exc}"
    return (module if reason is None else None), reason


def resolve(op: str, backend: str | None, tensors, **meta):
    """The backend module that runs ``op`` on ``tensors``; raises if an explicit one cannot."""
    name = validate_backend_name(backend)
    if name != "auto":
        module, reason = _candidate_reason(name, op, tensors, meta)
        if module is None:
            raise BackendUnavailable(f"backend {name!r} cannot run {op}: {reason}")
        return module
    device_type = tensors[0].device.type
    reasons = []
    for candidate in AUTO_ORDER.get(device_type, ("reference",)):
        module, reason = _candidate_reason(candidate, op, tensors, meta)
        if module is not None:
            return module
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailable(f"no backend can run {op} on {device_type}: " + "; ".join(reasons))


def explain(op: str, *tensors, **meta) -> dict[str, str | None]:
    """For each backend: ``None`` if it would run ``op`` on these inputs, else why not."""
    return {name: _candidate_reason(name, op, tensors, meta)[1] for name in BACKENDS}


def auto_backend_name(op: str, *tensors, **meta) -> str:
    """Name of the backend that ``backend="auto"`` picks for this call."""
    module = resolve(op, "auto", tensors, **meta)
    return next(name for name, path in BACKENDS.items() if path == module.__name__)


def can_run(op: str, backend: str | None, tensors, **meta) -> bool:
    """Whether ``backend`` (or, for "auto", any candidate) can run ``op`` on ``tensors``."""
    try:
        resolve(op, backend, tensors, **meta)
    except BackendUnavailable:
        return False
    return True
