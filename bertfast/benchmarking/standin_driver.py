"""A stand-in Triton driver for an sm_90 GPU on a machine without one: real compiles, stubbed launches.

With it active (:func:`install`), Triton's real compiler turns the kernels into cubins here and
its whole launch path runs (``Autotuner.run``, ``JITFunction.run``, ``CompiledKernel``), down
to the launcher object, which records each call instead of launching.  The binary loader is
a no-op and autotuning times every config the same (so only the chosen config compiles).
Tensors are CPU tensors of the GPU dtypes; nothing reads or writes them.

Used by ``bench/host_overhead.py`` (host time of a launch) and the tests of the cached launch.
Install it before the kernels first run and without ``TRITON_INTERPRET`` set.
"""

from __future__ import annotations

import torch

LAUNCHES: list[tuple] = []  # (grid x, y, z, stream, function, packed metadata, *kernel arguments) per launch


def record_launches(enabled: bool = True) -> None:
    """Keep the arguments of every launch in :data:`LAUNCHES` (off: count nothing, keep nothing)."""
    _State.record = enabled


class _State:
    record = True
    count = 0


def launch_count() -> int:
    return _State.count


class StubLauncher:
    """Takes a compiled kernel's launches: the object ``CompiledKernel.run`` is."""

    def __init__(self, src, metadata):
        self.name = getattr(metadata, "name", "?")

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter, exit_,
                 *args):  # fmt: skip
        _State.count += 1
        if _State.record:
            LAUNCHES.append((grid_x, grid_y, grid_z, stream, function, packed_metadata, *args))


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 32, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class StandInDriver:
    """Enough of ``triton.runtime.driver.active`` for compiling and launching (triton 3.6 to 3.9)."""

    def __init__(self, capability: int = 90):
        self.capability = capability
        self.utils = _Utils()
        self.launcher_cls = StubLauncher

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.capability, 10)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


def install(capability: int = 90) -> StandInDriver:
    """Make a :class:`StandInDriver` Triton's active driver; returns it."""
    import triton

    driver = StandInDriver(capability)
    triton.runtime.driver.set_active(driver)
    return driver
