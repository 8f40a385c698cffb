#!/usr/bin/env python
"""Static GPU compile check: every Triton kernel of kernels/, compiled to cubin with no GPU.

Each kernel is reached through the project's own launchers, called with CPU tensors of the
GPU dtypes while Triton's driver is replaced by a stand-in for an NVIDIA target (sm_90 by
default); the launch is intercepted and compiled instead (``JITFunction.warmup``).  So the
compiled binaries are exactly those a GPU would run for the same shapes: same constexprs,
same specialisations.  An autotuned kernel is compiled at every config it declares for the
launch (the attention kernels declare one list per operand width); the configs its
``prune_configs_by`` hook keeps are the ones the autotuner can pick ("kept"), the others are
compiled for the record ("pruned").  The CUDA kernels of csrc/cuda are compiled with nvcc to
cubin for the same targets.

From each cubin, ``cuobjdump --dump-resource-usage`` gives registers, stack and local memory
(spills) and static shared memory; Triton's metadata gives the dynamic shared memory.

Fails (exit 1) on a compile error, on shared memory above the device's per-block limit
(sm_90: 227 KiB, sm_80: 163 KiB), or on a spill, in any kept config.  Results are cached per
binary under ``build/gpu-compile-cache`` (key: the kernel's Triton cache key, which hashes
its source and everything it calls, the launch's arguments and config, the Triton version
and the target), so a rerun on unchanged kernels is instant.

    scripts/gpu-compile-check.py                       # sm_90, the whole matrix
    scripts/gpu-compile-check.py --subset ci           # what CI compiles (see SUBSETS)
    scripts/gpu-compile-check.py --arch 80 --arch 90 --write-table kernels/RESOURCES.md
    scripts/gpu-compile-check.py --check-table kernels/RESOURCES.md   # is the table current?
    scripts/gpu-compile-check.py --subset full --all-configs --json R.json   # then:
    scripts/gpu-compile-check.py --suggest-pruning R.json ...         # _DROPPED for attention.py

Must run without ``TRITON_INTERPRET`` (the kernels would be imported for the interpreter).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL_VERSION = "1"
DEFAULT_CACHE = ROOT / "build" / "gpu-compile-cache"
# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (32, 64, 80, 128)
LAYOUTS = ("padded", "mask", "varlen")  # padded without a mask, padded with a key mask, packed varlen
LN_HIDDEN = (100, 1024, 4096)
GELU_HIDDEN = (100, 4096)
POOL_HIDDEN = (384, 1024, 4096)  # mean pooling: MiniLM's, BERT-large's, a wide one
# FP8 activations (inference): hidden sizes of MiniLM (384) and BERT-large (1024) and the widest row
# (4096); the bias-GELU's FFN widths, MiniLM's 1536 and BERT-large's 4096.
FP8_HIDDEN = (384, 1024, 4096)
FP8_GELU_HIDDEN = (1536, 4096)
FP8_OPS = ("quantize_rows", "layer_norm_fp8", "bias_gelu_fp8")
# Triton compiles float8e4nv only from sm_89 (Ada, Hopper); before, the backend refuses the FP8 ops.
FP8_MIN_ARCH = 89

# What each subset compiles.  "full": every dtype, head size, layout, dropout and every declared
# config (kept or pruned).  "ci": BERT's own path (bf16 and fp16, head_dim 64, every layout, with
# and without dropout; LayerNorm at hidden 1024 and 4096, bias-GELU at 4096; the FP8 kernels at
# BERT-large's sizes, 1024 and FFN 4096) at the kept configs.
SUBSETS = {
    "full": dict(
        dtypes=DTYPES,
        head_dims=HEAD_DIMS,
        ln_hidden=LN_HIDDEN,
        gelu_hidden=GELU_HIDDEN,
        pool_hidden=POOL_HIDDEN,
        fp8_hidden=FP8_HIDDEN,
        fp8_gelu_hidden=FP8_GELU_HIDDEN,
        pruned=True,
    ),
    "ci": dict(
        dtypes=("float16", "bfloat16"),
        head_dims=(64,),
        ln_hidden=(1024, 4096),
        gelu_hidden=(4096,),
        pool_hidden=(384, 1024),
        fp8_hidden=(1024,),
        fp8_gelu_hidden=(4096,),
        pruned=False,
    ),
}


# ------------------------------------------------------------------------------------------------
# The stand-in driver and the launch capture (run inside the worker processes)
# ------------------------------------------------------------------------------------------------


def install_stand_in(arch: int) -> None:
    """Make Triton compile for ``sm_<arch>`` with no GPU (the stand-in driver of tools/gpu/standin_driver.py)."""
    from tools.gpu import standin_driver

    standin_driver.install(capability=arch)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launcher call: the op, its direction and what selects its constexprs."""

    op: str  # attention | layer_norm | bias_gelu | mean_pool | quantize_rows | layer_norm_fp8 | bias_gelu_fp8
    dtype: str
    head_dim: int = 0  # attention
    layout: str = ""  # attention: padded | mask | varlen
    dropout: bool = False
    hidden: int = 0  # layer_norm, bias_gelu
    residual: bool = False  # layer_norm
    linear_bias: bool = False  # layer_norm
    normalize: bool = False  # mean_pool

    def label(self) -> str:
        if self.op == "attention":
            return f"{self.dtype} d={self.head_dim} {self.layout}{' dropout' if self.dropout else ''}"
        if self.op in ("layer_norm", "layer_norm_fp8"):
            parts = [f"N={self.hidden}"]
            parts += [name for name, on in (("residual", self.residual), ("bias", self.linear_bias)) if on]
            parts += ["dropout"] if self.dropout else []
            parts += ["fp8"] if self.op == "layer_norm_fp8" else []
            return f"{self.dtype} " + " ".join(parts)
        if self.op == "mean_pool":
            return f"{self.dtype} N={self.hidden}{' normalize' if self.normalize else ''}"
        return f"{self.dtype} N={self.hidden}"


def variants(subset: str) -> list[Variant]:
    spec = SUBSETS[subset]
    out = []
    for dtype, head_dim, layout, dropout in itertools.product(spec["dtypes"], spec["head_dims"], LAYOUTS, (0, 1)):
        out.append(Variant("attention", dtype, head_dim=head_dim, layout=layout, dropout=bool(dropout)))
    for dtype, hidden, res, lb, dropout in itertools.product(spec["dtypes"], spec["ln_hidden"], (0, 1), (0, 1), (0, 1)):
        out.append(
            Variant("layer_norm", dtype, hidden=hidden, residual=bool(res), linear_bias=bool(lb), dropout=bool(dropout))
        )
    for dtype, hidden in itertools.product(spec["dtypes"], spec["gelu_hidden"]):
        out.append(Variant("bias_gelu", dtype, hidden=hidden))
    for dtype, hidden, normalize in itertools.product(spec["dtypes"], spec["pool_hidden"], (0, 1)):
        out.append(Variant("mean_pool", dtype, hidden=hidden, normalize=bool(normalize)))
    for dtype, hidden in itertools.product(spec["dtypes"], spec["fp8_hidden"]):
        out.append(Variant("quantize_rows", dtype, hidden=hidden))
    for dtype, hidden, res, lb in itertools.product(spec["dtypes"], spec["fp8_hidden"], (0, 1), (0, 1)):
        out.append(Variant("layer_norm_fp8", dtype, hidden=hidden, residual=bool(res), linear_bias=bool(lb)))
    for dtype, hidden in itertools.product(spec["dtypes"], spec["fp8_gelu_hidden"]):
        out.append(Variant("bias_gelu_fp8", dtype, hidden=hidden))
    return out


def compiles_for(arch: int, v: Variant) -> bool:
    """Whether ``v`` is built for ``sm_<arch>``: the FP8 kernels only from sm_89 (see FP8_MIN_ARCH)."""
    return v.op not in FP8_OPS or arch >= FP8_MIN_ARCH


@dataclasses.dataclass
class Launch:
    kernel: object  # a JITFunction or an Autotuner
    args: tuple
    kwargs: dict
    grid: object


@contextlib.contextmanager
def capture_launches():
    """Record ``kernel[grid](*args, **kwargs)`` calls instead of running them."""
    import triton

    launches: list[Launch] = []
    previous = triton.runtime.jit.KernelInterface.__getitem__

    def getitem(kernel, grid):
        return lambda *args, **kwargs: launches.append(Launch(kernel, args, kwargs, grid))

    triton.runtime.jit.KernelInterface.__getitem__ = getitem
    try:
        yield launches
    finally:
        triton.runtime.jit.KernelInterface.__getitem__ = previous


def _attention_launches(v: Variant, lengths=None) -> list[Launch]:
    """Forward and backward of the attention launchers at BERT's layout (q, k, v views of one QKV
    buffer, 16 heads).  ``lengths``: the sequences (padded: all of one length; varlen: packed)."""
    import torch
    from bertfast.kernels import attention as A

    dtype = getattr(torch, v.dtype)
    heads, d = 16, v.head_dim
    dropout_p = 0.1 if v.dropout else 0.0
    seed = torch.tensor(1234) if v.dropout else None
    if v.layout == "varlen":
        lengths = lengths or [128, 77, 1]
        qkv = torch.empty(sum(lengths), 3 * heads * d, dtype=dtype)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        mask, max_seqlen = None, max(lengths)
    else:
        lengths = lengths or [128, 128]
        qkv = torch.empty(len(lengths), lengths[0], 3 * heads * d, dtype=dtype)
        cu, max_seqlen = None, 0
        mask = torch.ones(len(lengths), lengths[0], dtype=torch.bool) if v.layout == "mask" else None
    q, k, v_ = qkv.unflatten(-1, (3, heads, d)).unbind(-3)
    with capture_launches() as launches:
        out, lse = A._forward(q, k, v_, mask, cu, max_seqlen, d**-0.5, dropout_p, seed)
        A._backward(torch.empty_like(out), q, k, v_, out, lse, mask, cu, max_seqlen, d**-0.5, dropout_p, seed)
    return launches


@contextlib.contextmanager
def _gpu_tiles(module):
    """The launchers pick interpreter tiles for CPU tensors: make them pick the GPU's (132 SMs, an H100).

    ``launch_config`` is the module's own tile choice, ``row_launch`` the FP8 row kernels' (``_fp8.py``)."""
    originals = {name: getattr(module, name) for name in ("launch_config", "row_launch") if hasattr(module, name)}

    def gpu_config(original):
        def config(*args, **kwargs):
            kwargs["gpu"] = True
            if "sm_count" in original.__code__.co_varnames:
                kwargs.setdefault("sm_count", 132)
            return original(*args, **kwargs)

        return config

    for name, original in originals.items():
        setattr(module, name, gpu_config(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


def _rows_launches(v: Variant, rows=None) -> list[Launch]:
    """LayerNorm, bias-GELU or mean pooling, forward and backward, on ``rows`` rows of ``v.hidden``;
    the FP8 kernels (forward only)."""
    import torch
    from bertfast.kernels import bias_gelu as G
    from bertfast.kernels import layer_norm as L
    from bertfast.kernels import mean_pool as P
    from bertfast.kernels import quantize_rows as Q

    dtype = getattr(torch, v.dtype)
    n = v.hidden
    rows = rows or (256 if v.op in ("layer_norm", "layer_norm_fp8") else 512)
    x = torch.empty(rows, n, dtype=dtype)
    modules = {"layer_norm": L, "bias_gelu": G, "mean_pool": P, "quantize_rows": Q, "layer_norm_fp8": L}
    module = modules.get(v.op, G)  # bias_gelu_fp8: G
    with _gpu_tiles(module), capture_launches() as launches:
        if v.op == "quantize_rows":
            Q._forward(x)
        elif v.op == "layer_norm_fp8":
            weight = torch.empty(n, dtype=dtype)
            residual = torch.empty_like(x) if v.residual else None
            linear_bias = torch.empty(n, dtype=dtype) if v.linear_bias else None
            L._forward_fp8(x, weight, weight, 1e-12, residual, linear_bias)
        elif v.op == "bias_gelu_fp8":
            G._forward_fp8(x, torch.empty(n, dtype=dtype))
        elif v.op == "mean_pool":
            cu_seqlens = torch.tensor([0, rows // 2, rows], dtype=torch.int32)
            pooled, mean = P._forward(x, cu_seqlens, v.normalize)
            P._backward(pooled, mean, cu_seqlens, x, v.normalize)
        elif v.op == "layer_norm":
            weight = torch.empty(n, dtype=dtype)
            residual = torch.empty_like(x) if v.residual else None
            linear_bias = torch.empty(n, dtype=dtype) if v.linear_bias else None
            dropout_p = 0.1 if v.dropout else 0.0
            seed = torch.tensor(1234) if v.dropout else None
            L._forward(x, weight, weight, 1e-12, residual, linear_bias, dropout_p, seed)
            stat = torch.empty(rows, dtype=torch.float32)
            L._backward(torch.empty_like(x), x, weight, stat, stat, residual, linear_bias, dropout_p, seed)
        else:
            bias = torch.empty(n, dtype=dtype)
            G._forward(x, bias)
            G._backward(torch.empty_like(x), x, bias)
    return launches


def launches_of(v: Variant, lengths=None, rows=None) -> list[Launch]:
    """What the launchers of ``v`` launch (captured, not run); shapes as the two helpers above."""
    return _attention_launches(v, lengths) if v.op == "attention" else _rows_launches(v, rows)


def _jit_fn(kernel):
    while not hasattr(kernel, "cache_key"):
        kernel = kernel.fn
    return kernel


def _describe(value) -> str:
    """What of a launch argument reaches Triton's cache key: a tensor's dtype and alignment, an int's value class."""
    if hasattr(value, "data_ptr"):
        return f"T:{value.dtype}:{value.data_ptr() % 16 == 0}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return f"i:{value % 16 == 0}:{value == 1}:{-(2**31) <= value < 2**31}"
    if isinstance(value, float):
        return "f"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Job:
    arch: int
    variant: Variant
    kernel: str  # the jit function's name
    config: int  # index into the autotuner's configs; -1 for a plain jit launch


def _configs(launch: Launch):
    """(all configs, indices kept by the kernel's pruning for this launch); one pseudo-config for plain jit."""
    import triton

    if isinstance(launch.kernel, triton.runtime.Autotuner):
        at = launch.kernel
        at.nargs = dict(zip(at.arg_names, launch.args))
        try:
            kept = at.prune_configs(dict(launch.kwargs))
            # The configs declared for this launch (e.g. for its dtype); the rest are not listed.
            declared = getattr(at.early_config_prune, "candidates", lambda configs, nargs, **kw: configs)
            configs = list(declared(at.configs, at.nargs, **launch.kwargs))
        finally:
            at.nargs = None
        return configs, [i for i, c in enumerate(configs) if c in kept]
    return [None], [0]


def config_text(config, kwargs) -> str:
    if config is None:  # a plain launch: the launcher's own constexprs and warps
        blocks = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "ROWS"))}
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    else:
        blocks, warps, stages = config.kwargs, config.num_warps, config.num_stages
    return " ".join(f"{k.replace('BLOCK_', '').replace('_PER_PROGRAM', '')}={v}" for k, v in blocks.items()) + (
        f" w{warps} s{stages}"
    )


# ------------------------------------------------------------------------------------------------
# Worker: one compile
# ------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(arch: int, triton_cache: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default; silences its warning
    sys.path.insert(0, str(ROOT))
    install_stand_in(arch)
    _WORKER["arch"] = arch
    _WORKER["launches"] = {}


def _launch_for(variant: Variant, kernel: str) -> Launch:
    cache = _WORKER["launches"]
    if variant not in cache:
        cache[variant] = {_jit_fn(launch.kernel).__name__: launch for launch in launches_of(variant)}
    return cache[variant][kernel]


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per function: REG, STACK, SHARED, LOCAL from cuobjdump --dump-resource-usage."""
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        tool = Path(shutil.which("cuobjdump") or "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    usage, name = {}, None
    for line in text.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return usage


def compile_job(job: Job) -> dict:
    """Compile one binary and read its resources (in a worker whose stand-in targets job.arch)."""
    launch = _launch_for(job.variant, job.kernel)
    configs, _ = _configs(launch)
    config = configs[job.config] if job.config >= 0 else None
    fn = _jit_fn(launch.kernel)
    extra = config.all_kwargs() if config is not None else {}
    start = time.time()
    record = {"error": None}
    try:
        compiled = fn.warmup(*launch.args, grid=(1,), **launch.kwargs, **extra)
        usage = resource_usage(compiled.asm["cubin"])
        (res,) = usage.values()
        record.update(
            reg=res["REG"], stack=res["STACK"], local=res["LOCAL"], static_shared=res["SHARED"],
            shared=compiled.metadata.shared,
        )  # fmt: skip
    except Exception as e:  # a compile error is a result, reported and failed on by the caller
        record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    record["seconds"] = round(time.time() - start, 2)
    return record


def job_key(job: Job, triton_version: str) -> str:
    launch = _launch_for(job.variant, job.kernel)
    configs, _ = _configs(launch)
    config = configs[job.config] if job.config >= 0 else None
    parts = [
        TOOL_VERSION, triton_version, str(job.arch), _jit_fn(launch.kernel).cache_key,
        repr([_describe(a) for a in launch.args]), repr(sorted(launch.kwargs.items())),
        repr(config.all_kwargs()) if config is not None else "",
    ]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def plan_variant(arch: int, variant: Variant, pruned: bool, triton_version: str) -> list[dict]:
    """The jobs of one variant: one row per (kernel, config), with its cache key."""
    rows = []
    for launch in launches_of(variant):
        fn = _jit_fn(launch.kernel)
        _WORKER["launches"].setdefault(variant, {})[fn.__name__] = launch
        configs, kept = _configs(launch)
        for i, config in enumerate(configs):
            if i not in kept and not pruned:
                continue
            job = Job(arch, variant, fn.__name__, i if config is not None else -1)
            shape = None if config is None else [*config.kwargs.values(), config.num_warps, config.num_stages]
            rows.append(
                dict(
                    job=job,
                    kept=i in kept,
                    config=config_text(config, launch.kwargs),
                    shape=shape,
                    key=job_key(job, triton_version),
                )
            )
    return rows


# ------------------------------------------------------------------------------------------------
# CUDA kernels of csrc/
# ------------------------------------------------------------------------------------------------


def cuda_rows(arch: int, cache_dir: Path, jobs: int = 1) -> list[dict]:
    """nvcc -cubin each csrc/cuda/*.cu for sm_<arch>; one row per kernel function."""
    nvcc = shutil.which("nvcc")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if nvcc is None or not sources:
        return []
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    headers = "".join(p.read_text() for p in sorted((ROOT / "csrc" / "cuda").glob("*.*")))

    def one(source: Path) -> list[dict]:
        key = hashlib.sha256(f"{TOOL_VERSION}|{version}|{arch}|{source.name}|{headers}".encode()).hexdigest()[:32]
        path = cache_dir / f"cuda-{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", str(source), "-o", str(cubin)]
            result = subprocess.run(["nice", *cmd], capture_output=True, text=True)
            if result.returncode != 0:
                return [dict(kernel=source.name, variant="", config="", error=result.stderr.strip()[-300:])]
            found = [
                dict(
                    kernel=f"{source.name}:{_demangle(name)}",
                    variant="",
                    config="",
                    error=None,
                    reg=u["REG"],
                    stack=u["STACK"],
                    local=u["LOCAL"],
                    static_shared=u["SHARED"],
                    shared=0,
                )  # fmt: skip
                for name, u in sorted(resource_usage(cubin.read_bytes()).items())
            ]
        path.write_text(json.dumps(found))
        return found

    with cf.ThreadPoolExecutor(jobs) as pool:
        rows = [row for found in pool.map(one, sources) for row in found]
    for row in rows:
        row.update(arch=arch, op="cuda", kept=True, shape=None)
    return rows


def _demangle(name: str) -> str:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if filt is None:
        return name
    out = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name
    return out.replace("(anonymous namespace)::", "")


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def status(row: dict) -> str:
    if row.get("error"):
        return "ERROR"
    problems = []
    if row["stack"] or row["local"]:
        problems.append("spills")
    if row["shared"] + row["static_shared"] > SHARED_LIMIT[row["arch"]]:
        problems.append("shared>limit")
    if problems:
        return ",".join(problems)
    return "ok" if row["reg"] < 255 else "ok (255 regs)"


def run_matrix(archs, subset, jobs, cache_dir: Path, all_configs=False, log=lambda *a: print(*a, flush=True)):
    """Compile (or read from the cache) every binary of ``subset`` (a name, or {arch: name}) per target."""
    import triton

    cache_dir.mkdir(parents=True, exist_ok=True)
    triton_cache = str(cache_dir / f"triton-{triton.__version__}")
    rows: list[dict] = []
    for arch in archs:
        _worker_init(arch, triton_cache)
        name = subset[arch] if isinstance(subset, dict) else subset
        planned = [
            r
            for v in variants(name)
            if compiles_for(arch, v)
            for r in plan_variant(arch, v, all_configs or SUBSETS[name]["pruned"], triton.__version__)
        ]
        todo = {}
        for r in planned:
            path = cache_dir / f"{r['key']}.json"
            if path.exists():
                r.update(json.loads(path.read_text()))
            else:
                todo.setdefault(r["key"], []).append(r)
        log(f"sm_{arch}: {len(planned)} binaries, {len(todo)} to compile (triton {triton.__version__}, {jobs} jobs)")
        start = time.time()
        if todo:
            ctx = __import__("multiprocessing").get_context("spawn")
            with cf.ProcessPoolExecutor(
                jobs, mp_context=ctx, initializer=_worker_init, initargs=(arch, triton_cache)
            ) as pool:
                futures = {pool.submit(compile_job, group[0]["job"]): key for key, group in todo.items()}
                for n, future in enumerate(cf.as_completed(futures), 1):
                    key = futures[future]
                    result = future.result()
                    if not result["error"]:  # errors are not cached: a rerun tries again
                        job = todo[key][0]["job"]
                        about = dict(kernel=job.kernel, variant=job.variant.label(), config=todo[key][0]["config"])
                        (cache_dir / f"{key}.json").write_text(json.dumps({**result, "about": about}))
                    for r in todo[key]:
                        r.update(result)
                    if n % 25 == 0 or n == len(todo):
                        log(f"  {n}/{len(todo)} compiled, {time.time() - start:.0f} s")
        for r in planned:
            job = r.pop("job")
            r.update(
                arch=arch, op=job.variant.op, kernel=job.kernel, variant=job.variant.label(),
                triton=triton.__version__, v=dataclasses.asdict(job.variant),
            )  # fmt: skip
        rows += planned
        rows += cuda_rows(arch, cache_dir, jobs)
    for r in rows:
        r["status"] = status(r)
    return rows


def failures(rows) -> list[dict]:
    return [r for r in rows if r["kept"] and not r["status"].startswith("ok")]


def source_digest() -> str:
    """What decides the binaries, and nothing else: the text of every jit function in kernels/, the
    full plan (every kernel, variant, config, kept or pruned, and the launchers' constexprs) and the
    CUDA sources.  Line numbers, docstrings outside jit functions and launch validation do not count,
    so only a change that can change a binary makes the committed table stale."""
    import triton

    h = hashlib.sha256()
    for arch in sorted(SHARED_LIMIT):  # what the autotuner keeps depends on the target
        _worker_init(arch, os.environ.get("TRITON_CACHE_DIR", str(DEFAULT_CACHE / "triton")))
        for v in variants("full"):
            if not compiles_for(arch, v):
                continue
            for launch in launches_of(v):
                configs, kept = _configs(launch)
                constexprs = {k: val for k, val in launch.kwargs.items() if not hasattr(val, "data_ptr")}
                h.update(repr((arch, v, _jit_fn(launch.kernel).__name__, sorted(constexprs.items()))).encode())
                h.update(repr([(config_text(c, launch.kwargs), i in kept) for i, c in enumerate(configs)]).encode())
    import bertfast.kernels as kernels

    for path in sorted((ROOT / "kernels").glob("*.py")):
        module = __import__(f"bertfast.kernels.{path.stem}", fromlist=["_"]) if path.stem != "__init__" else kernels
        for name, value in sorted(vars(module).items()):
            if isinstance(value, triton.runtime.JITFunction):
                h.update(f"{path.stem}.{name}\0{value.src}\0".encode())
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def render_table(rows, archs, triton_version: str, subsets: dict) -> str:
    lines = [
        "# Resource usage of the GPU kernels (generated)",
        "",
        "Written by `make gpu-resources` (`scripts/gpu-compile-check.py --arch 80 --arch 90 --write-table "
        "kernels/RESOURCES.md`); do not edit.  Compiled with no GPU: Triton's own compiler down to cubin for "
        "each target, nvcc for csrc/cuda; registers, stack and local memory (spills) and static shared memory "
        "read by cuobjdump, Triton's dynamic shared memory from its metadata.  `kept`: a config the autotuner "
        "can pick for that variant; `pruned`: dropped by the kernel's config pruning (compiled for the record). "
        "Every kept row must be ok: no spill, shared memory within the device's limit (sm_90: 227 KiB, sm_80: "
        "163 KiB).",
        "",
        f"sources: {source_digest()} · triton {triton_version} · targets: "
        + ", ".join(f"sm_{a} ({subsets[a]} matrix)" for a in archs),
        "",
    ]
    for arch in archs:
        part = [r for r in rows if r["arch"] == arch]
        bad = failures(part)
        lines += [
            f"## sm_{arch}",
            "",
            f"{len(part)} binaries, {sum(r['kept'] for r in part)} kept, "
            f"{sum(not r['kept'] for r in part)} pruned; {len(bad)} kept binaries fail.",
            "",
            *(
                [
                    f"FP8 kernels ({', '.join(FP8_OPS)}) not built: Triton compiles `float8e4nv` only from "
                    f"sm_{FP8_MIN_ARCH} (FP8 e4m3 needs Ada or Hopper), and the Triton backend refuses them below.",
                    "",
                ]
                if arch < FP8_MIN_ARCH
                else []
            ),
            "| kernel | variant | config | | REG | spill (stack/local B) | shared B (dyn+static) | status |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
        ]
        for r in part:
            if r.get("error"):
                lines.append(
                    f"| {r['kernel']} | {r['variant']} | {r['config']} | {'kept' if r['kept'] else 'pruned'} "
                    f"| | | | ERROR: {r['error'].replace('|', '/')} |"
                )
                continue
            lines.append(
                f"| {r['kernel']} | {r['variant']} | {r['config']} | {'kept' if r['kept'] else 'pruned'} | {r['reg']} "
                f"| {r['stack']}/{r['local']} | {r['shared']}+{r['static_shared']} | {r['status']} |"
            )
        lines.append("")
    return "\n".join(lines)


ATTENTION_KERNELS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def suggest_pruning(paths) -> str:
    """The attention kernels' drop table (kernels/attention.py, _DROPPED) from --json results: a config is
    dropped for (kernel, target, operand width, padded head size, dropout) if it fails in any layout
    under any of the Triton versions the results come from."""
    dropped: dict = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            if r.get("kernel") not in ATTENTION_KERNELS:
                continue
            v = r["v"]
            key = (
                ATTENTION_KERNELS[r["kernel"]], r["arch"], 32 if v["dtype"] == "float32" else 16,
                max(16, 1 << (v["head_dim"] - 1).bit_length()), v["dropout"],
            )  # fmt: skip
            bad = dropped.setdefault(key, set())
            if not status(r).startswith("ok"):
                bad.add(tuple(r["shape"]))
    lines = ["_DROPPED = {"]
    for key in sorted(dropped):
        extra = dropped[key] - (dropped.get((key[0], 90, *key[2:]), set()) if key[1] < 90 else set())
        if extra:  # a target before sm_90 lists only what it drops beyond sm_90's entry
            lines.append(f"    {key!r}: {sorted(extra, reverse=True)!r},")
    lines.append("}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, action="append", choices=sorted(SHARED_LIMIT), help="target (90; repeatable)"
    )
    parser.add_argument("--subset", choices=sorted(SUBSETS), default="full")
    parser.add_argument("--arch-subset", action="append", metavar="ARCH=SUBSET", help="another subset for one target")
    parser.add_argument("--all-configs", action="store_true", help="compile pruned configs too (as --subset full does)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--write-table", type=Path, help="write the resource table (markdown) here")
    parser.add_argument("--check-table", type=Path, help="fail if this table was made from other kernel sources")
    parser.add_argument("--json", type=Path, help="write every row as JSON here")
    parser.add_argument("--digest", action="store_true", help="print the digest of what decides the binaries")
    parser.add_argument("--suggest-pruning", type=Path, nargs="+", metavar="JSON", help="print _DROPPED from results")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    archs = args.arch or [90]
    sys.path.insert(0, str(ROOT))
    import triton

    if args.suggest_pruning:
        print(suggest_pruning(args.suggest_pruning))
        return 0
    if args.digest:
        print(source_digest())
        return 0
    if args.check_table:
        text = args.check_table.read_text() if args.check_table.exists() else ""
        m = re.search(r"^sources: (\w+)", text, re.MULTILINE)
        if not m or m.group(1) != source_digest():
            print(f"{args.check_table} is stale (made from other kernel sources): run `make gpu-resources`")
            return 1
        print(f"{args.check_table} matches the kernel sources ({m.group(1)})")
        return 0
    start = time.time()
    subsets = {arch: args.subset for arch in archs}
    for item in args.arch_subset or []:
        arch, _, name = item.partition("=")
        if int(arch) not in subsets or name not in SUBSETS:
            parser.error(f"--arch-subset {item}: want ARCH=SUBSET for a given --arch and one of {sorted(SUBSETS)}")
        subsets[int(arch)] = name
    rows = run_matrix(archs, subsets, args.jobs, args.cache, all_configs=args.all_configs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.write_table:
        args.write_table.write_text(render_table(rows, archs, triton.__version__, subsets))
        print(f"wrote {args.write_table}")
    bad = failures(rows)
    pruned_bad = [r for r in rows if not r["kept"] and not r["status"].startswith("ok")]
    print(
        f"{len(rows)} binaries ({sum(r['kept'] for r in rows)} kept) for {', '.join(f'sm_{a}' for a in archs)} "
        f"in {time.time() - start:.0f} s; {len(pruned_bad)} pruned configs would fail; {len(bad)} kept ones fail"
    )
    for r in bad:
        detail = r.get("error") or f"REG {r['reg']} stack {r['stack']} local {r['local']} shared {r['shared']}"
        print(f"FAIL sm_{r['arch']} {r['kernel']} [{r['variant']}] {r['config']}: {r['status']} ({detail})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
