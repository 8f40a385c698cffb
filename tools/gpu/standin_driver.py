"""A stand-in Triton driver for an sm_90 GPU on a machine without one: real compiles, stubbed launches.

With it active (:func:`install`), Triton's real compiler turns the kernels into cubins here and
its whole launch path runs (``Autotuner.run``, ``JITFunction.run``, ``CompiledKernel``), down
to the launcher object, which records each call instead of launching.  The binary loader is
a no-op and autotuning times every config the same (so only the chosen config compiles).
Tensors are CPU tensors of the GPU dtypes; nothing reads or writes them.

``install(real_launcher=True)`` (triton 3.9, needs a C compiler) goes one level lower: Triton's
own launcher runs, with its C ``launch`` (argument packing, pointer checks, launch hooks), built
against a stub ``libcuda.so.1`` whose functions, ``cuLaunchKernelEx`` included, return success
and do nothing (it counts the launches).

Used by ``tools/gpu/kernel_host_time.py`` (host time of a launch) and the tests of the cached launch.
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


_CUDA_STUBS = (
    "cuCtxGetCurrent cuCtxGetDevice cuCtxGetLimit cuCtxSetCurrent cuCtxSetLimit cuDeviceGet cuDeviceGetAttribute "
    "cuDevicePrimaryCtxRetain cuDriverGetVersion cuFuncGetAttribute cuFuncSetAttribute cuFuncSetCacheConfig "
    "cuGetErrorString cuModuleGetFunction cuModuleLoadData cuModuleUnload cuPointerGetAttribute "
    "cuPointerGetAttributes cuStreamIsCapturing cuOccupancyMaxActiveClusters cuTensorMapEncodeTiled "
    "cuTensorMapEncodeIm2col"
).split()
_STUB_LIBCUDA = None


def _stub_libcuda():
    """Build and load a ``libcuda.so.1`` whose functions succeed and do nothing; ``cuLaunchKernelEx`` counts."""
    global _STUB_LIBCUDA
    if _STUB_LIBCUDA is None:
        import ctypes
        import os
        import subprocess
        import tempfile

        folder = tempfile.mkdtemp(prefix="bertfast-stub-libcuda-")
        source = os.path.join(folder, "stub.c")
        with open(source, "w") as f:
            f.write("int launches = 0;\nint cuLaunchKernelEx(void) { launches++; return 0; }\n")
            f.writelines(f"int {name}(void) {{ return 0; }}\n" for name in _CUDA_STUBS)
        library = os.path.join(folder, "libcuda.so.1")
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", library, source], check=True)
        os.symlink("libcuda.so.1", os.path.join(folder, "libcuda.so"))
        _STUB_LIBCUDA = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)  # dlopen("libcuda.so.1") finds it now
        os.environ["TRITON_LIBCUDA_PATH"] = folder
    return _STUB_LIBCUDA


def install(capability: int = 90, real_launcher: bool = False) -> StandInDriver:
    """Make a :class:`StandInDriver` Triton's active driver; returns it.

    ``real_launcher``: Triton's own launcher and C launch against a stub libcuda (see above).
    """
    import triton

    driver = StandInDriver(capability)
    if real_launcher:
        from triton.backends.nvidia import driver as nvidia

        library = _stub_libcuda()
        real = nvidia.CudaUtils()  # compiles Triton's driver.c against the stub
        driver.utils.launch = real.launch
        driver.utils.build_signature_metadata = real.build_signature_metadata
        driver.launcher_cls = nvidia.CudaLauncher
        driver.stub_libcuda = library
    triton.runtime.driver.set_active(driver)
    return driver


def launch_count() -> int:
    """Launches so far: recorded by :class:`StubLauncher`, or counted by the stub ``cuLaunchKernelEx``."""
    if _STUB_LIBCUDA is not None:
        import ctypes

        return ctypes.c_int.in_dll(_STUB_LIBCUDA, "launches").value + _State.count
    return _State.count
