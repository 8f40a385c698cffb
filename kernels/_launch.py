"""Launcher helpers shared by the kernel files: interpreter detection, the device guard, 2-D row views,
the eager fast path's test and the cached launch of a kernel's compiled binary.

Host time per kernel call matters: at BERT-large's 32 x 128 a forward makes about 97 kernel
calls and keeps the GPU busy for less time than the Python takes.  Three things keep it low:

- :func:`eager_fast_path`: in eager mode the public entry points call their launcher directly
  (through a ``torch.autograd.Function`` when a gradient is needed) instead of the
  ``torch.library`` custom op; under ``torch.compile``, a dispatch or torch-function mode, or
  with tensor subclasses (fake, functional, DTensor ...), they take the custom op as before.
- Launchers keep the decisions that depend only on shapes, strides, dtypes and devices
  (checks, tile shapes, grids, strides) in a small dict per launcher (:class:`PlanCache`).
- :class:`CachedLaunch`: after Triton (its autotuner included) has chosen and compiled a binary
  for a launch key, later launches with that key call the binary's launcher directly, skipping
  ``Autotuner.run`` and ``JITFunction.run`` (which bind and specialise ~30 arguments per call).
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
from torch import overrides
from torch.utils import _python_dispatch
from triton import knobs
from triton.runtime import driver

_NULL_CONTEXT = contextlib.nullcontext()
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); nothing on the CPU or when already there."""
    if t.device.type != "cuda":
        return _NULL_CONTEXT
    index = t.device.index
    if index is None or index == torch.cuda.current_device():
        return _NULL_CONTEXT
    return torch.cuda.device(index)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D ``(rows, N)`` view with unit column stride.

    A copy is made only when the leading dimensions cannot be flattened into one row
    stride or the last dimension is not contiguous.
    """
    rows = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        rows = rows.contiguous()
    return rows


def row_stride(t: torch.Tensor) -> int | None:
    """``t``'s row stride as a ``(rows, N)`` matrix with unit column stride, or ``None`` when that needs a copy.

    The kernels take such a tensor as it is (its data pointer) with this stride: no view is made
    per call.  ``None``: :func:`as_rows` copies it.
    """
    n = t.shape[-1] if t.dim() > 0 else 1
    try:
        rows = t.view(-1, n)
    except RuntimeError:  # the leading dimensions do not flatten into one stride
        return None
    if rows.stride(-1) != 1 and n > 1:
        return None
    return rows.stride(0)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (``triton.cdiv`` costs microseconds per call in recent tritons)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), like ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# --------------------------------------------------------------------------- eager fast path


def eager_fast_path(*tensors) -> bool:
    """Whether an entry point may run its launcher directly instead of through its custom op.

    True in plain eager mode: not compiling or jit-tracing, no torch-dispatch or torch-function
    mode (other than ones that only observe, such as ``bertfast.launches.LaunchCounter``), no
    functorch transform, every tensor (``None`` allowed) a plain ``torch.Tensor`` or
    ``nn.Parameter``, the first not on the meta device.  Everywhere else the custom op (with its
    fake and autograd registrations) is what runs, as torch.compile, FakeTensorMode and the like need.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records the custom op
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()) and not _observers_only():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSOR_TYPES:
            return False
    return not tensors[0].is_meta  # meta tensors: the op's fake kernel gives the shapes


def _observers_only() -> bool:
    """Every active torch-dispatch and torch-function mode only observes (``bertfast.launches``' counters):
    what they count must be what eager mode runs."""
    modes = (*_python_dispatch._get_current_dispatch_mode_stack(), *overrides._get_current_function_mode_stack())
    return all(getattr(mode, "observes_eager_path", False) for mode in modes)


def needs_grad(*tensors) -> bool:
    """Whether autograd must record a call on these tensors (``None`` allowed)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def profiled(name: str):
    """A ``record_function`` range named like the custom op while the profiler runs, else a no-op context.

    The eager fast path skips the dispatcher, which is what names custom ops in profiles.
    """
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.autograd.profiler.record_function(name)
    return _NULL_CONTEXT


# --------------------------------------------------------------------------- per-shape plans


def tensor_key(t: torch.Tensor | None):
    """What a launch plan may depend on in a tensor: shape, strides, dtype, device (``None`` for ``None``)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


class PlanCache(dict):
    """Launch decisions keyed by what they depend on (shapes, strides, dtypes, devices, flags).

    Bounded: cleared when full (a padding-free model sees a new token count per batch).
    """

    def __init__(self, max_entries: int = 512):
        super().__init__()
        self.max_entries = max_entries

    def put(self, key, plan):
        if len(self) >= self.max_entries:
            self.clear()
        self[key] = plan
        return plan


# --------------------------------------------------------------------------- cached launches

_launch_keys = itertools.count()


def next_launch_key() -> int:
    """A fresh small int naming one plan's launch (cheap to hash, unlike the plan's own key)."""
    return next(_launch_keys)


def _launch_hooks_idle() -> bool:
    """No launch hook is installed (a profiler such as proton installs them; the cached launch passes none).

    Triton 3.6-3.9 keep the hooks in ``HookChain`` objects, empty by default.
    """
    runtime = knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _jit_function(kernel):
    """The ``JITFunction`` under an ``Autotuner`` (or the kernel itself)."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


class CachedLaunch:
    """Launch a ``@triton.jit`` kernel (autotuned or not), reusing the binary Triton chose for a key.

    ``launch = CachedLaunch(globals(), "kernel_name")``, then ``launch(key, grid, args, constexprs)``:
    ``args`` are the kernel's runtime arguments in order, pointers (tensors) first;
    ``constexprs`` its ``tl.constexpr`` arguments (which must all come after the runtime ones)
    and launch options; ``grid`` a tuple or a function of the meta-parameters (the constexprs
    and the autotuned config).  ``key`` must determine
    everything Triton specialises a binary on apart from the pointers' 16-byte alignment (added
    here): the tensors' dtypes, the constexprs, the integer arguments' values (``== 1``,
    divisibility by 16, 32 or 64 bits), the autotuning key and the grid.  Floats never
    specialise.

    The first launch for a key (and device and alignment) goes through Triton's normal
    path (``kernel[grid](...)``: autotuning, compiling, caching), which returns the compiled
    kernel; later ones call that kernel's launcher with the same arguments Triton's path
    would pass it.  Anything unknown (the interpreter, launch hooks, an older or newer API)
    leaves Triton's path in charge.  Triton settings changed at run time (``knobs`` such as
    debug or instrumentation) reach only keys launched afterwards for the first time.
    """

    def __init__(self, namespace: dict, name: str):
        # The kernel is looked up by name at each launch, so a test may replace the module's kernel.
        self.namespace, self.name = namespace, name
        self.kernel = None
        self.jit = None
        self.entries: dict = {}
        self.n_pointers: int | None = None
        self.fast_launches = 0  # launches that took the cached binary (tests count them)
        self.enabled = not interpreting()
        self.disabled_because = "Triton's interpreter" if not self.enabled else None

    def _bind(self, kernel) -> None:
        self.kernel, self.jit = kernel, _jit_function(kernel)
        self.entries.clear()
        self.n_pointers = None

    def __call__(self, key, grid, args, constexprs):
        kernel = self.namespace[self.name]
        if kernel is not self.kernel:
            self._bind(kernel)
        if self.enabled and self.n_pointers is not None:
            active = driver.active
            device = active.get_current_device()
            full_key = (device, key, *[t.data_ptr() & 15 for t in args[: self.n_pointers]])
            entry = self.entries.get(full_key)
            if entry is not None and _launch_hooks_idle():
                run, function, metadata, grid0, grid1, grid2, tail = entry
                run(grid0, grid1, grid2, active.get_current_stream(device), function, metadata, None, None, None,
                    *args, *tail)  # fmt: skip
                self.fast_launches += 1
                return
        else:
            full_key = None
        compiled = kernel[grid](*args, **constexprs)
        if self.enabled:
            self._remember(full_key, key, grid, args, constexprs, compiled)

    def _remember(self, full_key, key, grid, args, constexprs, compiled) -> None:
        """Keep what the launch needs from the kernel Triton just ran; give up quietly on the unknown."""
        try:
            if self.n_pointers is None:
                n = 0
                while n < len(args) and isinstance(args[n], torch.Tensor):
                    n += 1
                self.n_pointers = n
                device = driver.active.get_current_device()
                full_key = (device, key, *[t.data_ptr() & 15 for t in args[:n]])
            if not _launch_hooks_idle():
                return
            function = getattr(compiled, "function", None)  # None: e.g. an asynchronous compile
            metadata = getattr(compiled, "packed_metadata", None)
            run = getattr(compiled, "run", None) if function is not None else None
            if function is None or metadata is None or not callable(run) or getattr(self.jit, "pre_run_hooks", None):
                return
            meta = dict(constexprs)
            best = getattr(self.kernel, "best_config", None)
            if best is not None:
                meta.update(best.all_kwargs())
            names = list(self.jit.arg_names)
            tail = tuple(meta[name] for name in names[len(args) :])
            if callable(grid):
                grid = grid({**dict(zip(names, args)), **meta})
            grid = (*grid, 1, 1)[:3]
            if len(self.entries) >= 256:
                self.entries.clear()
            self.entries[full_key] = (run, function, metadata, *grid, tail)
        except Exception as exc:  # an API this code does not know: Triton's own path keeps working
            self.enabled = False
            self.disabled_because = repr(exc)
