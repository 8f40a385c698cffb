"""The machine a run was measured on: device name and slug, versions, commit, and peaks.

The peaks are measured in the same run as the results (never taken from a data sheet):
a large bf16 matmul gives the achievable TFLOP/s, a large device-to-device copy the
achievable GB/s (bytes read + bytes written).  Every kernel row is divided by them.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

import torch

from .timing import GPU_PLAN, SMOKE_PLAN, TimingPlan, measure

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine() or 'unknown'}"


def gpu_state(device: torch.device) -> dict[str, str]:
    """The SM clock and temperature now (``nvidia-smi``), "n/a" where there is none to read."""
    state = {"sm_clock_mhz": "n/a", "temperature_c": "n/a"}
    if device.type != "cuda":
        return state
    index = device.index if device.index is not None else torch.cuda.current_device()
    query = ["nvidia-smi", f"--id={index}", "--query-gpu=clocks.sm,temperature.gpu", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        state["sm_clock_mhz"], state["temperature_c"] = (v.strip() for v in out.strip().split(",")[:2])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return state


def capability(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{major}.{minor}"
    return "cpu"


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (a folder name)."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not text:
        raise ValueError(f"cannot make a folder name out of device name {name!r}")
    return text


def repository_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit() -> str:
    """Short commit of the checkout (``BERTFAST_COMMIT`` overrides; ``unknown`` without git)."""
    if os.environ.get("BERTFAST_COMMIT"):
        return os.environ["BERTFAST_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=repository_root(),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: torch.device) -> dict:
    """The header of a result file (everything but ``peaks`` and ``results``)."""
    name = device_name(device)
    return {
        "gpu": name,
        "slug": slug(name),
        "device_kind": device.type,
        "capability": capability(device),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "date": utc_now(),
    }


def measure_peaks(device: torch.device, plan: TimingPlan | None = None) -> dict[str, float]:
    """Achievable bf16 matmul TFLOP/s and copy GB/s on ``device``, measured now."""
    cuda = device.type == "cuda"
    plan = plan or (GPU_PLAN if cuda else SMOKE_PLAN)
    n = 8192 if cuda else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul = measure(torch.matmul, [(a, b), (b, a)], device=device, plan=plan)
    del a, b
    elements = (1 << 29) if cuda else (1 << 22)  # 1 GiB / 8 MiB of bf16 per buffer
    src = torch.empty(elements, device=device, dtype=torch.bfloat16).uniform_()
    dst = torch.empty_like(src)
    copy = measure(torch.Tensor.copy_, [(dst, src)], device=device, plan=plan)
    moved = 2.0 * src.numel() * src.element_size()
    del src, dst
    return {
        "bf16_matmul_tflops": 2.0 * n**3 / (matmul.median_ms * 1e-3) / 1e12,
        "copy_gbps": moved / (copy.median_ms * 1e-3) / 1e9,
    }
