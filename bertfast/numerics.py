"""Tolerances and error measures, shared by the tests and the benchmarks.

The policy (see the engineering notes):

- fp32 kernels: relative error ``||out - ref|| / ||ref||`` against a float64 reference
  at most ``FP32_REL_TOL[direction]``.
- fp16 / bf16 kernels: max abs error against the float64 reference at most
  ``LOWP_FACTOR[direction]`` times the max abs error of PyTorch's own implementation run
  at the same low precision, plus ``LOWP_FLOOR[dtype]``.  The bound scales with the
  problem instead of a magic atol.
"""

from __future__ import annotations

import torch

FP32_REL_TOL = {"forward": 1e-5, "backward": 1e-4}
LOWP_FACTOR = {"forward": 2.0, "backward": 3.0}
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

# Whole-model parity (the reference path against Hugging Face, fp32, valid positions).
MODEL_FP32_REL_TOL = 1e-5


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def lowp_bound(torch_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, direction: str) -> float:
    """The max abs error allowed for a kernel at ``dtype`` (fp16/bf16)."""
    return LOWP_FACTOR[direction] * max_abs_error(torch_lowp, ref64) + LOWP_FLOOR[dtype]


def assert_close(
    out: torch.Tensor,
    ref64: torch.Tensor,
    *,
    direction: str = "forward",
    torch_lowp: torch.Tensor | None = None,
    name: str = "output",
) -> None:
    """Assert ``out`` matches the float64 reference under the policy for ``out.dtype``.

    For fp16/bf16 pass ``torch_lowp``: PyTorch's own result at the same precision.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the output")
    if out.dtype in (torch.float32, torch.float64):
        err = rel_error(out, ref64)
        tol = FP32_REL_TOL[direction]
        if not err <= tol:
            raise AssertionError(f"{name} ({direction}, {out.dtype}): relative error {err:.3e} > {tol:.1e}")
        return
    if torch_lowp is None:
        raise ValueError(f"{name}: a low-precision check needs PyTorch's own result (torch_lowp)")
    err = max_abs_error(out, ref64)
    bound = lowp_bound(torch_lowp, ref64, out.dtype, direction)
    if not err <= bound:
        raise AssertionError(
            f"{name} ({direction}, {out.dtype}): max abs error {err:.3e} > bound {bound:.3e} "
            f"({LOWP_FACTOR[direction]}x PyTorch's {max_abs_error(torch_lowp, ref64):.3e} + floor)"
        )
