#!/usr/bin/env python
"""A Triton cache of the first-light kernels, compiled here (no GPU) for a GPU machine.

    python -m tools.gpu.triton_cache prepare DIR   compile for sm_90 into DIR (run under the GPU machine's triton;
                                  scripts/prepare-triton-cache.sh lays triton 3.6 over .venv)
    python -m tools.gpu.triton_cache relocate DIR  on the GPU machine, after unpacking: point the cache's
                                  index files at DIR (Triton stores absolute paths in them)
    python -m tools.gpu.triton_cache verify DIR    on the GPU machine: does this Triton compute the key the cache
                                  was made for?  Prints what differs; exit 1 on a mismatch
    python -m tools.gpu.triton_cache hits DIR      replay the first-light compiles against DIR and count Triton's
                                  cache hits (exit 1 on a miss); seconds on a GPU machine

Then ``TRITON_CACHE_DIR=DIR`` makes the autotuner's compiles of these kernels cache hits.

What the cache key is made of (triton 3.6 and 3.9, ``triton.runtime.cache.get_cache_key``):
``triton_key()`` (the Triton version, sha256 of its compiler/backends/language Python files and
of ``_C/libtriton.so``), the kernel's source hash (its source and callees, its first line number,
the constexpr globals it reads, the specialisation of every argument: dtypes, 16-byte alignment
of pointers, divisibility by 16 of integers, the constexpr values), the backend hash (the
``ptxas --version`` text of the ptxas Triton runs, bundled in the wheel unless
``TRITON_PTXAS_PATH`` is set, and the target arch), the compile options (warps, stages, fp
fusion, debug, the libdevice file's hash...) and every cache-invalidating environment variable
that is set (``TRITON_DEFAULT_FP_FUSION``, ``TRITON_DISABLE_LINE_INFO``, ``MLIR_ENABLE_DUMP``, ...).

The one part that depends on the machine: ``libtriton.so`` differs between the wheels for each
Python version (cp311 here, cp312 on the GPU machine); every Python file and the bundled ptxas are
identical.  So ``prepare`` compiles with this machine's Triton but files each kernel under the key
the GPU machine computes, with the cp312 wheel's ``libtriton.so`` hash (LIBTRITON_SHA256 below,
or ``--libtriton-sha256``; read from the wheel with ``pip download --no-deps --python-version
3.12 --only-binary=:all: triton==3.6.0``).  ``verify`` checks that on the GPU machine.

The cache keeps only each kernel's ``.cubin`` and ``.json`` (what a cache hit loads), not the IRs.
The C launcher stubs (``__triton_launcher.so``, ``cuda_utils.so``) are still built on the GPU
machine, once per kernel signature: they need that machine's Python headers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# sha256 of triton/_C/libtriton.so in triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
LIBTRITON_SHA256 = {("3.6.0", "cp312"): "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87"}
MANIFEST = "bertfast-triton-cache.json"
ARCH = 90


def _check_module():
    from tools.gpu import compile_check

    return compile_check


def _triton_key_with(libtriton_sha256: str) -> str:
    """``triton.runtime.cache.triton_key()`` as computed with another ``libtriton.so``."""
    import triton.runtime.cache as cache

    original = getattr(cache, "_unpatched_triton_key", cache.triton_key)
    cache._unpatched_triton_key = original
    here = original()
    lib = Path(cache.__file__).parents[1] / "_C" / "libtriton.so"
    ours = hashlib.sha256(lib.read_bytes()).hexdigest()
    assert here.count(ours) == 1, "triton_key() no longer hashes libtriton.so as expected"
    return here.replace(ours, libtriton_sha256)


def first_light_variants(check):
    """bf16 and fp16 at BERT-large's geometry (16 heads x 64, hidden 1024, intermediate 4096), and the FP8
    kernels (bf16 in) at BERT-large's and all-MiniLM-L6-v2's."""
    V = check.Variant
    out = []
    for dtype in ("bfloat16", "float16"):
        for layout in check.LAYOUTS:
            for dropout in (False, True):
                out.append(V("attention", dtype, head_dim=64, layout=layout, dropout=dropout))
        for residual in (False, True):
            for linear_bias in (False, True):
                for dropout in (False, True):
                    out.append(
                        V("layer_norm", dtype, hidden=1024, residual=residual, linear_bias=linear_bias, dropout=dropout)
                    )
        out.append(V("bias_gelu", dtype, hidden=4096))
    # FP8 inference computes in bf16: BERT-large's rows and all-MiniLM-L6-v2's (the accuracy section).
    for hidden, ffn in ((1024, 4096), (384, 1536)):
        out.append(V("quantize_rows", "bfloat16", hidden=hidden))
        out.append(V("layer_norm_fp8", "bfloat16", hidden=hidden, residual=True, linear_bias=True))
        out.append(V("bias_gelu_fp8", "bfloat16", hidden=ffn))
    return out


# Shapes of first light: padded batches 32 x 128 and 8 x 512; packed (varlen) batches whose
# token count and longest sequence are or are not multiples of 16 (Triton specialises on that).
# Varlen: longest sequence 128 with 206 tokens, 100 with 161, 128 with 256 (a full batch packed).
# LayerNorm and bias-GELU: 4096 rows (32 x 128, 8 x 512) and 2931 (a packed batch).
ATTENTION_SHAPES = {
    "padded": [[128] * 32, [512] * 8],
    "varlen": [[128, 77, 1], [100, 61], [128, 128]],
}
ROW_COUNTS = (4096, 2931)


def _setup(cache_dir: Path, libtriton_sha256: str | None):
    """Point Triton at ``cache_dir`` with a clean environment; file kernels under the given libtriton hash."""
    os.environ.pop("TRITON_INTERPRET", None)
    for name in list(os.environ):  # any cache-invalidating variable set here would change every key
        if name.startswith(("TRITON_", "MLIR_", "LLVM_", "NVPTX_")) and name != "TRITON_CACHE_DIR":
            print(f"unsetting {name} (it would enter the cache key)")
            del os.environ[name]
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    sys.path.insert(0, str(ROOT))
    check = _check_module()
    import torch
    import triton.runtime.cache as cache

    key = None
    if libtriton_sha256:
        key = _triton_key_with(libtriton_sha256)
        cache.triton_key = lambda: key  # get_cache_key reads it from this module
    if not torch.cuda.is_available():
        check.install_stand_in(ARCH)
    return check, key


def _warm(args) -> int:
    """In a worker: compile the given first-light variants into the cache (every kept config)."""
    cache_dir, libtriton_sha256, indices = args
    check, _ = _setup(Path(cache_dir), libtriton_sha256)
    variants = first_light_variants(check)
    n = 0
    for i in indices:
        for launch in _first_light_launches(check, variants[i]):
            kernels = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
            n += len(kernels) if isinstance(kernels, list) else 1
    return n


def _warm_all(check, cache_dir: Path, libtriton_sha256, only=None, jobs: int = 1) -> int:
    """Compile every first-light variant (``only``: one op), spread over ``jobs`` processes."""
    import concurrent.futures as cf
    import multiprocessing

    indices = [i for i, v in enumerate(first_light_variants(check)) if not only or v.op == only]
    # Attention variants first and dealt round-robin: they are the slow ones.
    parts = [indices[k::jobs] for k in range(jobs)]
    if jobs == 1:
        return _warm((str(cache_dir), libtriton_sha256, indices))
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_warm, [(str(cache_dir), libtriton_sha256, part) for part in parts]))


def prepare(outdir: Path, libtriton_sha256: str | None, only: str | None = None, jobs: int = 1) -> int:
    import triton

    outdir = outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    target_py = "cp312"
    sha = libtriton_sha256 or LIBTRITON_SHA256.get((triton.__version__, target_py))
    if sha is None:
        print(f"no libtriton.so hash known for triton {triton.__version__} {target_py}: pass --libtriton-sha256")
        return 2
    check, key = _setup(outdir, sha)
    start = time.time()
    compiled = _warm_all(check, outdir, sha, only, jobs)
    _strip(outdir)
    manifest = {
        "triton": triton.__version__,
        "python_wheel": target_py,
        "prepared_with": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "arch": ARCH,
        "triton_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "libtriton_sha256": sha,
        "ptxas": _ptxas_version(),
        "options": _default_options(),
        "kernels": len(list(outdir.glob("*/*.cubin"))),
    }
    (outdir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in outdir.rglob("*") if p.is_file())
    print(
        f"{manifest['kernels']} kernels ({compiled} launches warmed) in {outdir}: {size / 1e6:.1f} MB, "
        f"{time.time() - start:.0f} s"
    )
    return 0


def hits(cache_dir: Path, libtriton_sha256: str | None, only: str | None = None) -> int:
    """Replay the first-light compiles against the cache and count Triton's cache hits (on the GPU
    machine: with its own driver and key; here: with the stand-in and ``--libtriton-sha256``)."""
    import triton

    check, _ = _setup(cache_dir.resolve(), libtriton_sha256)
    seen = {"hit": 0, "miss": 0}

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        seen["hit" if cache_hit else "miss"] += 1

    triton.knobs.compilation.listener = listener
    start = time.time()
    _warm(
        (
            str(cache_dir.resolve()),
            libtriton_sha256,
            [i for i, v in enumerate(first_light_variants(check)) if not only or v.op == only],
        )
    )
    print(f"{seen['hit']} cache hits, {seen['miss']} misses ({time.time() - start:.1f} s)")
    return 1 if seen["miss"] else 0


def _first_light_launches(check, variant):
    """The launches of one variant at every first-light shape (the launchers' own arguments)."""
    if variant.op == "attention":
        shapes = ATTENTION_SHAPES["varlen" if variant.layout == "varlen" else "padded"]
        return [launch for lengths in shapes for launch in check.launches_of(variant, lengths=lengths)]
    return [launch for rows in ROW_COUNTS for launch in check.launches_of(variant, rows=rows)]


def _default_options() -> dict:
    """The compile options every key hashes, as this Triton sets them (environment knobs included)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    # As JITFunction.run passes them: the environment's debug and instrumentation knobs.
    knobs_set = {"debug": knobs.runtime.debug, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    options = dict(make_backend(GPUTarget("cuda", ARCH, 32)).parse_options(knobs_set).__dict__)
    options["extern_libs"] = [
        (name, hashlib.sha256(Path(path).read_bytes()).hexdigest()) for name, path in options["extern_libs"]
    ]
    return json.loads(json.dumps(options, default=str))


def _ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version

    return get_ptxas_version(ARCH).strip().splitlines()[-1]


def _strip(outdir: Path) -> None:
    """Keep what a cache hit loads (.cubin, .json); drop the IRs and repoint the index files."""
    for group in outdir.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        kept = {}
        for name, path in data.get("child_paths", {}).items():
            p = group.parent / Path(path).name
            if name.endswith((".cubin", ".json")):
                kept[name] = str(p)
            elif p.exists():
                p.unlink()
        group.write_text(json.dumps({"child_paths": kept}))


def relocate(cache_dir: Path) -> int:
    """Point every index file at the cache's present directory (Triton reads absolute paths)."""
    cache_dir = cache_dir.resolve()
    n = 0
    for group in cache_dir.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        paths = {name: str(group.parent / Path(path).name) for name, path in data.get("child_paths", {}).items()}
        group.write_text(json.dumps({"child_paths": paths}))
        n += 1
    print(f"relocated {n} cache entries to {cache_dir}")
    return 0


def verify(cache_dir: Path) -> int:
    """Does this machine's Triton compute the key the cache was prepared for?"""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import triton_key

    manifest = json.loads((cache_dir / MANIFEST).read_text())
    problems = []
    if triton.__version__ != manifest["triton"]:
        problems.append(f"triton {triton.__version__}, the cache is for {manifest['triton']}")
    if hashlib.sha256(triton_key().encode()).hexdigest() != manifest["triton_key_sha256"]:
        problems.append("triton_key() differs (another wheel: Python version or build)")
    if _ptxas_version() != manifest["ptxas"]:
        problems.append(f"ptxas {_ptxas_version()!r}, the cache was made with {manifest['ptxas']!r}")
    options = _default_options()
    if options != manifest["options"]:
        changed = {k: (v, manifest["options"].get(k)) for k, v in options.items() if manifest["options"].get(k) != v}
        problems.append(f"compile options differ (here, cache): {changed}")
    env = get_cache_invalidating_env_vars()
    if env:
        problems.append(f"cache-invalidating environment variables are set: {env}")
    for p in problems:
        print("MISMATCH:", p)
    if not problems:
        print(
            f"the cache's {manifest['kernels']} kernels match this Triton ({triton.__version__}, sm_{manifest['arch']})"
        )
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "relocate", "verify", "hits"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--libtriton-sha256", help="sha256 of the GPU machine's triton/_C/libtriton.so")
    parser.add_argument(
        "--only",
        choices=("attention", "layer_norm", "bias_gelu", "quantize_rows", "layer_norm_fp8", "bias_gelu_fp8"),
        help="one op (for testing)",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.dir, args.libtriton_sha256, args.only, args.jobs)
    if args.command == "hits":
        return hits(args.dir, args.libtriton_sha256, args.only)
    if args.command == "relocate":
        return relocate(args.dir)
    return verify(args.dir)


if __name__ == "__main__":
    sys.exit(main())
