"""Build bertfast: the Python package, the Triton kernels (as bertfast.kernels) and the
C++/CUDA extension ``bertfast._C`` (the "ext" backend of :mod:`bertfast.ops`).

    pip install -e . --no-build-isolation

The extension is compiled against the torch already installed, hence ``--no-build-isolation``:
pip's default isolated build environment has no torch, and must not fetch one, since the
extension has to match the torch it will run with. A build made against one torch does not load
into another, so build it where it runs; each torch version gets its own module,
``bertfast._C_torch<version>`` (bertfast/_ext_name.py), and its own build folder, so
environments on one checkout keep their builds apart. Its CPU kernels are always built. Its CUDA
kernels (csrc/cuda/*.cu) include only CUDA's own headers: nvcc compiles them into plain objects
that are linked, with the static CUDA runtime, into the same module, so no GPU is needed to
build (or to import) it. Without the extension the package still works; the "ext" backend then
says why it is unavailable.

Build knobs (environment variables):

``BERTFAST_BUILD_EXT``
    ``0`` skips the extension entirely.  Otherwise a failing C++ build fails the install.
``BERTFAST_CUDA``
    ``auto`` (default): build the CUDA kernels when torch has CUDA (``torch.version.cuda``)
    and nvcc is found; ``1``: require them (fail with the reason if nvcc or the static CUDA
    runtime is missing; works with a CPU-only torch too, as a cross-compile); ``0``: never.
``TORCH_CUDA_ARCH_LIST``
    GPU architectures, default ``"8.0;9.0"``; e.g. ``"9.0"``, ``"8.0;8.6;9.0+PTX"``
    (``+PTX`` also embeds PTX for newer GPUs).
``CUDA_HOME`` / ``CUDA_PATH``
    The CUDA toolkit (``bin/nvcc``, ``lib64/libcudart_static.a``).  Default: the toolkit of
    the ``nvcc`` on ``PATH``, else ``/usr/local/cuda``.
``MAX_JOBS``
    Parallel compile jobs (default: the number of CPUs).

At runtime ``bertfast._ext.extension().has_cuda()`` and ``.cuda_archs()`` tell what was built.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
extension_module_name = runpy.run_path(str(ROOT / "bertfast" / "_ext_name.py"))["extension_module_name"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _note(message: str) -> None:
    print(f"bertfast setup: {message}", file=sys.stderr)


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise SystemExit(f"bertfast setup: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------
# Finding the CUDA toolkit
# ------------------------------------------------------------------------------------------------


def _cuda_home() -> Path | None:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = Path(os.path.realpath(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    for candidate in (Path("/usr/local/cuda"),):
        if (candidate / "bin" / "nvcc").exists():
            return candidate
    return None


def _nvcc(home: Path | None) -> str | None:
    if home is not None and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cudart_static_dir(home: Path | None) -> Path | None:
    if home is None:
        return None
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST such as "8.0;9.0+PTX"."""
    flags = []
    for arch in filter(None, re.split(r"[;,\s]+", arch_list.strip())):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if match is None:
            raise SystemExit(
                f"bertfast setup: cannot read architecture {arch!r} in TORCH_CUDA_ARCH_LIST={arch_list!r} "
                "(write e.g. '8.0;9.0' or '9.0+PTX')"
            )
        number = f"{match[1]}{match[2]}{match[3]}"
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match[4]:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    if not flags:
        raise SystemExit(f"bertfast setup: TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags


class CudaPlan:
    """Whether and how to build the CUDA kernels, decided once from the environment."""

    def __init__(self, torch_cuda: str | None):
        mode = _env_choice("BERTFAST_CUDA", "auto", ("auto", "0", "1"))
        self.home = _cuda_home()
        self.nvcc = _nvcc(self.home)
        self.cudart_dir = _cudart_static_dir(self.home)
        self.archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
        missing = []
        if self.nvcc is None:
            missing.append("nvcc was not found (put it on PATH or set CUDA_HOME)")
        if self.cudart_dir is None:
            missing.append(f"libcudart_static.a was not found under the CUDA toolkit {self.home}")
        if mode == "0":
            self.enabled, self.reason = False, "BERTFAST_CUDA=0"
        elif mode == "1":
            if missing:
                raise SystemExit("bertfast setup: BERTFAST_CUDA=1 but " + "; ".join(missing))
            self.enabled, self.reason = True, "BERTFAST_CUDA=1"
        elif torch_cuda is None:
            self.enabled, self.reason = False, "torch has no CUDA (set BERTFAST_CUDA=1 to build the kernels anyway)"
        elif missing:
            self.enabled, self.reason = False, "; ".join(missing)
        else:
            self.enabled, self.reason = True, f"torch has CUDA {torch_cuda} and nvcc is at {self.nvcc}"
        self.gencode = gencode_flags(self.archs) if self.enabled else []


# ------------------------------------------------------------------------------------------------
# The extension
# ------------------------------------------------------------------------------------------------


def _extension_setup() -> tuple[list, dict]:
    if os.environ.get("BERTFAST_BUILD_EXT", "1").strip() == "0":
        _note("BERTFAST_BUILD_EXT=0: not building the C++/CUDA extension bertfast._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            f"bertfast setup: building bertfast._C needs torch, and this build cannot see it ({exc}).  If torch is "
            "installed, this is pip's build isolation (pip's default): it builds in a fresh environment without "
            "your packages.  The extension must be compiled against the torch it will run with, so build with "
            "`pip install --no-build-isolation .` (or `-e .`; setuptools and wheel must be installed too).  "
            "Otherwise install torch first, or set BERTFAST_BUILD_EXT=0 to skip the extension"
        ) from exc

    plan = CudaPlan(torch.version.cuda)
    _note(f"CUDA kernels {'on' if plan.enabled else 'off'}: {plan.reason}")

    module = extension_module_name(torch.__version__)
    _note(f"building the extension as bertfast.{module} for torch {torch.__version__}")
    extension = CppExtension(
        name=f"bertfast.{module}",
        sources=["csrc/bindings.cpp", "csrc/cpu/kernels.cpp"],
        include_dirs=[str(CSRC)],
        # -g0: no debug info (Python's flags ask for it; it doubles the compile time of torch headers).
        # Unwind tables and the frame header, named although they are the defaults: a bad argument is a C++
        # exception unwinding through these frames into pybind11.  One build (with a compiler wrapper) died on
        # such an exception, cause not found; this rules out one suspect, and
        # bertfast._ext.errors_reach_python checks any build.
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", "-fexceptions", "-fasynchronous-unwind-tables"]},
        extra_link_args=["-fopenmp", "-Wl,--eh-frame-hdr"],
    )
    if plan.enabled:
        extension.library_dirs.append(str(plan.cudart_dir))
        extension.libraries.extend(["cudart_static", "rt", "dl", "pthread"])

    class BuildBertfastExtension(BuildExtension):
        """Writes the build-facts header, compiles the .cu files with nvcc, then builds the module, all in a
        build folder of this torch and Python's own (kept between builds, so rebuilds are incremental)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / f"temp-{module}-py{sys.version_info[0]}{sys.version_info[1]}")

        def build_extensions(self):
            for ext in self.extensions:
                if ext.name == extension.name:
                    generated = Path(self.build_temp).resolve() / "bertfast_generated"
                    generated.mkdir(parents=True, exist_ok=True)
                    self._write_build_info(generated / "bertfast_build_info.h")
                    ext.include_dirs.append(str(generated))
                    if plan.enabled:
                        ext.extra_objects.extend(self._compile_cuda(generated / "cuda"))
            super().build_extensions()

        @staticmethod
        def _write_build_info(path: Path) -> None:
            lines = [
                "// Generated by setup.py: what this build of bertfast._C contains.",
                "#pragma once",
                f'#define BERTFAST_BUILD_TORCH_VERSION "{torch.__version__}"',
                f'#define BERTFAST_CUDA_ARCHS "{plan.archs if plan.enabled else ""}"',
            ]
            if plan.enabled:
                lines.append("#define BERTFAST_WITH_CUDA 1")
            text = "\n".join(lines) + "\n"
            if not path.exists() or path.read_text() != text:  # rewriting would force a rebuild
                path.write_text(text)

        def _compile_cuda(self, out_dir: Path) -> list[str]:
            out_dir.mkdir(parents=True, exist_ok=True)
            sources = sorted((CSRC / "cuda").glob("*.cu"))
            headers = [*(CSRC / "cuda").glob("*.h"), *(CSRC / "cuda").glob("*.cuh")]
            newest_header = max((h.stat().st_mtime for h in headers), default=0.0)
            jobs = []
            for source in sources:
                obj = out_dir / (source.stem + ".o")
                command = [
                    plan.nvcc,
                    "-c",
                    str(source),
                    "-o",
                    str(obj),
                    "-std=c++17",
                    "-O3",
                    "-DNDEBUG",
                    "-Xcompiler",
                    "-fPIC",
                    f"-I{CSRC / 'cuda'}",
                    *plan.gencode,
                ]
                stamp = obj.with_suffix(".cmd")
                fresh = (
                    obj.exists()
                    and stamp.exists()
                    and stamp.read_text() == " ".join(command)
                    and obj.stat().st_mtime >= max(source.stat().st_mtime, newest_header)
                )
                jobs.append((source, obj, stamp, command, fresh))

            def run(job):
                source, obj, stamp, command, fresh = job
                if fresh:
                    return
                _note(f"nvcc {source.relative_to(ROOT)}")
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(
                        f"nvcc failed on {source} (exit {result.returncode}):\n{' '.join(command)}\n"
                        f"{result.stdout}{result.stderr}"
                    )
                stamp.write_text(" ".join(command))

            with ThreadPoolExecutor(max_workers=_jobs()) as pool:
                list(pool.map(run, jobs))
            return [str(job[1]) for job in jobs]

    return [extension], {"build_ext": BuildBertfastExtension}


ext_modules, cmdclass = _extension_setup()

setup(
    name="bertfast",
    version="0.1.0",
    description="A custom-kernel performance engine for BERT: Triton and C++/CUDA kernels, HF-compatible.",
    python_requires=">=3.10",
    packages=["bertfast", "bertfast.ops", "bertfast.kernels", "bertfast.benchmarking"],
    package_dir={"bertfast": "bertfast", "bertfast.kernels": "kernels"},
    install_requires=["torch>=2.11", "safetensors", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=5"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["bertfast = bertfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
