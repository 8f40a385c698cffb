"""Counting what a step launches and where it waits for the device, on any device (the CPU included).

On a GPU host each launch costs tens of microseconds of Python and dispatch, and each host
sync drains the queue, so an eager step's host time is roughly its launch count times the
cost of one.  :class:`LaunchCounter` counts, while it is active:

- ``aten``: ATen ops that run a kernel.  Every op that reaches the dispatcher counts (in-place
  and ``out=`` variants included) except those that never touch data: views (an op whose
  schema returns an alias: ``view``, ``t``, ``unbind``, ``expand``, ``detach`` ...), the
  aliases without a view schema in :data:`NO_KERNEL` and allocations (``empty*``; zero-filled
  ones such as ``zeros`` count, they run a fill).  Custom ops that still dispatch (another
  backend's, or an entry point outside the eager fast path) count as one op each.  A
  ``_foreach_*`` or fused optimizer op counts once (on a GPU it may launch one kernel per
  chunk of tensors).
- ``triton``: Triton kernel launches through the project's launcher
  (:class:`bertfast.kernels._launch.CachedLaunch`); ATen ops inside a launch (Triton's CPU
  interpreter copies tensors) are not counted.
- ``syncs``: host reads of device values: ``_local_scalar_dense`` (``.item()``), ``nonzero``,
  ``masked_select``, ``.tolist()``, ``.numpy()`` and copies to the CPU from another device.  On
  the CPU every tensor is the device's, so a read of a host-side tensor (the dropout seed drawn
  on the CPU generator) counts too.  The first three are ATen ops and count in ``aten`` as well.

The model's Triton entry points keep their eager fast path under this counter (it declares
itself an observer, see ``kernels/_launch.py``), so what is counted is what an eager step runs.
``launches`` is ``aten + triton``: the number the host pays for.

    with LaunchCounter() as counter:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    print(counter.launches, counter.syncs, counter.by_name.most_common(10))
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops without a view schema that still run no kernel: aliases, metadata, allocation.
NO_KERNEL = frozenset(
    {
        aten._unsafe_view,
        aten.lift_fresh,
        aten.set_,
        aten.empty,
        aten.empty_strided,
        aten.empty_like,
        aten.new_empty,
        aten.new_empty_strided,
        aten.resize_,
        aten.sym_size,
        aten.sym_stride,
        aten.sym_numel,
        aten.sym_storage_offset,
        aten.is_same_size,
        aten._has_compatible_shallow_copy_type,
        aten.promote_types,
    }
)

# ATen ops that read device values back to the host.
SYNC_OPS = frozenset({aten._local_scalar_dense, aten.nonzero, aten.masked_select})

# Tensor methods that read values back to the host without an ATen op on the CPU.
_SYNC_METHODS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy})


def _device_to_host(func, args, kwargs) -> bool:
    """A copy whose source is on a device and whose destination is the CPU."""
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func in (aten.copy_.default, aten.copy.default):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class _DispatchCounter(TorchDispatchMode):
    observes_eager_path = True  # kernels._launch.eager_fast_path: an observer, not a transform

    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if not counter.inside_launch:
            packet = func.overloadpacket
            if not func.is_view and packet not in NO_KERNEL and func.namespace != "profiler":
                counter.aten += 1
                counter.by_name[str(packet)] += 1
            if packet in SYNC_OPS or _device_to_host(func, args, kwargs):
                counter.syncs += 1
                counter.syncs_by_name[str(packet)] += 1
        return func(*args, **kwargs)


class _MethodCounter(TorchFunctionMode):
    observes_eager_path = True

    def __init__(self, counter: LaunchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_METHODS and not self.counter.inside_launch:
            self.counter.syncs += 1
            self.counter.syncs_by_name[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class LaunchCounter(contextlib.AbstractContextManager):
    """Counts ATen kernel launches, Triton launches and host syncs while active (see the module doc)."""

    def __init__(self):
        self.aten = 0
        self.triton = 0
        self.syncs = 0
        self.by_name: Counter[str] = Counter()  # ATen op name (and "triton:<kernel>") -> launches
        self.syncs_by_name: Counter[str] = Counter()
        self.inside_launch = False
        self._stack = contextlib.ExitStack()

    @property
    def launches(self) -> int:
        return self.aten + self.triton

    def _count_triton(self, name: str) -> None:
        self.triton += 1
        self.by_name[f"triton:{name}"] += 1

    def __enter__(self):
        try:
            from bertfast.kernels import _launch
        except ImportError:  # no triton: no Triton launches to count
            _launch = None
        if _launch is not None:
            self._count_cached_launches(_launch)
        self._stack.enter_context(_MethodCounter(self))
        self._stack.enter_context(_DispatchCounter(self))
        return self

    def _count_cached_launches(self, _launch) -> None:
        counter = self
        original = _launch.CachedLaunch.__call__

        def counted_launch(launch, *args, **kwargs):
            if counter.inside_launch:
                return original(launch, *args, **kwargs)
            counter._count_triton(launch.name)
            counter.inside_launch = True
            try:
                return original(launch, *args, **kwargs)
            finally:
                counter.inside_launch = False

        _launch.CachedLaunch.__call__ = counted_launch
        self._stack.callback(setattr, _launch.CachedLaunch, "__call__", original)

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def summary(self) -> str:
        return f"{self.launches} launches ({self.aten} ATen, {self.triton} Triton), {self.syncs} host syncs"
