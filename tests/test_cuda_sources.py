"""The CUDA sources under csrc/ compile with nvcc for sm_80 and sm_90, with no GPU present.

CI builds the extension against a CPU-only torch, so without this check a .cu file that no
longer compiles would only be found on a GPU machine.  Warnings fail too.  The sources must
include CUDA's own headers only (torch's CUDA headers do not build against a CPU torch).
Skipped only when nvcc is not on PATH.

The binding (csrc/bindings.cpp) is checked statically too, because its CUDA branches only
run on a GPU: every function checks all its arguments (the CUDA row limit included) before
its device guard, allocations and CUDA calls, and runs its kernels with the GIL released
only inside ``without_gil``, so that an exception is never raised without the GIL.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
NVCC = shutil.which("nvcc")


def nvcc_command(source: Path, obj: Path) -> list[str]:
    return [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(obj),
        "-std=c++17",
        "-O3",
        "-Xcompiler",
        "-fPIC",
        "-Werror",
        "all-warnings",
        *GENCODE,
    ]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[Path, subprocess.CompletedProcess]:
    """nvcc's result for every source, compiled two at a time (CI has 2 cores)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        return subprocess.run(nvcc_command(source, out_dir / f"{source.stem}.o"), capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CUDA_SOURCES, pool.map(compile_one, CUDA_SOURCES)))


def test_every_op_family_has_a_cuda_source():
    assert {p.name for p in CUDA_SOURCES} >= {"layer_norm.cu", "bias_gelu.cu", "softmax.cu"}


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm80_and_sm90(source, compiled):
    result = compiled[source]
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("source", sorted((CSRC / "cuda").glob("*.*")), ids=lambda p: p.name)
def test_cuda_side_includes_no_torch_header(source):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', source.read_text(), flags=re.MULTILINE)
    banned = [name for name in includes if re.match(r"(torch|ATen|c10|pybind11)/", name)]
    assert not banned, f"{source.name} includes {banned}; the CUDA side may include CUDA's own headers only"


# ------------------------------------------------------------------------------------------------
# csrc/bindings.cpp: argument checks first, kernels without the GIL, errors with it
# ------------------------------------------------------------------------------------------------

BINDINGS = CSRC / "bindings.cpp"
# Bindings whose CUDA launcher keeps a row in shared memory (cu::kMaxRowElements).
ROW_KERNEL_PREFIXES = ("layer_norm", "embedding_layer_norm", "masked_softmax")


def _function_body(text: str, name: str) -> str:
    """The body (between the outer braces) of the C++ function ``name`` defined in ``text``."""
    match = re.search(rf"\b{name}\((?:[^(){{;]|\([^()]*\))*\)\s*\{{", text)
    assert match is not None, f"no definition of {name} in {BINDINGS.name}"
    depth, start = 1, match.end()
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unbalanced braces in {name}")


def _kernel_bindings() -> dict[str, str]:
    """{python name: C++ body} of every bound function that runs kernels (it has a device guard)."""
    text = BINDINGS.read_text()
    bound = dict(re.findall(r'm\.def\("(\w+)",\s*&(\w+)', text))
    bodies = {name: _function_body(text, function) for name, function in bound.items()}
    kernels = {name: body for name, body in bodies.items() if "DeviceGuard" in body}
    assert len(kernels) >= 8, sorted(bodies)
    return kernels


@pytest.mark.parametrize("binding", sorted(_kernel_bindings()))
def test_binding_checks_every_argument_before_any_device_work(binding):
    body = _kernel_bindings()[binding]
    assert body.count("c10::DeviceGuard") == 1, f"{binding}: expected one device guard"
    checks, work = body.split("c10::DeviceGuard")
    early = re.findall(r"at::(?:empty|zeros)\b|use_device_of|cuda_workspace|\bcu::|bertfast::cpu::|data_ptr", checks)
    assert not early, f"{binding} allocates or touches the device before its argument checks end: {early}"
    late = [c for c in re.findall(r"\b(TORCH_CHECK|check_\w+)\(", work) if c != "check_cuda_status"]
    assert not late, f"{binding} checks arguments after its device guard / allocations: {late}"
    if binding.startswith(ROW_KERNEL_PREFIXES):
        assert re.search(r"\bcheck_cuda_row\(|\bcheck_(?:embedding|softmax)_args\(", checks), (
            f"{binding} does not check the CUDA kernels' row limit before its device guard"
        )


@pytest.mark.parametrize("binding", sorted(_kernel_bindings()))
def test_binding_runs_kernels_only_without_the_gil(binding):
    """Every kernel call sits in a without_gil block; a CUDA status becomes an error after it."""
    lines = [line.strip() for line in _kernel_bindings()[binding].splitlines() if line.strip()]
    calls = [
        i
        for i, line in enumerate(lines)
        if re.search(r"\bcu::(?!\w*workspace_floats)\w+\(|BERTFAST_DISPATCH_CPU\(", line)
    ]
    assert calls, f"{binding} calls no kernel"
    for i in calls:
        assert lines[i - 1] == "without_gil([&] {", f"{binding}: kernel call outside without_gil: {lines[i]}"
    for i, line in enumerate(lines):
        if line.startswith("int status = 0;"):
            rest = "\n".join(lines[i:])
            assert re.search(r"without_gil\(\[&\] \{.*?\}\);\s*check_cuda_status\(fn, status\);", rest, re.S), (
                f"{binding}: the CUDA status is not checked right after the kernel"
            )


def test_no_binding_releases_the_gil_for_its_whole_call():
    """A call guard releasing the GIL would raise the argument errors without it (a crash on the GPU machine)."""
    text = BINDINGS.read_text()
    module = text[text.index("PYBIND11_MODULE") :]
    assert "gil_scoped_release" not in module and "call_guard" not in module
    assert text.count("py::gil_scoped_release") == 1, "release the GIL only in without_gil"
    helper = _function_body(text, "without_gil")
    assert "catch (...)" in helper and "std::rethrow_exception" in helper


def test_binding_compiles_with_the_cuda_kernels():
    """bindings.cpp's CUDA branches (BERTFAST_WITH_CUDA) are only built where torch has CUDA: check
    here that they still compile, warnings included, against this torch's headers (syntax only)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [f"-isystem{path}" for path in (*include_paths(), sysconfig.get_paths()["include"])]
    command = [
        compiler,
        "-fsyntax-only",
        "-std=c++17",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DBERTFAST_WITH_CUDA=1",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-I{CSRC}",
        *includes,
        str(BINDINGS),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"
