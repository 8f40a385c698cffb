"""Exceptions raised by bertfast."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (or cannot run these inputs).

    The message always says why: a missing package, no GPU, an unsupported dtype
    or head size.  bertfast never falls back silently from an explicit backend.
    """


def check_inference_only(op: str, *tensors) -> None:
    """Refuse, while grad mode is on, inputs (``None`` allowed) that autograd would record for ``op``, an
    op without a backward (the FP8 quantizing ops: quantization has no useful gradient)."""
    import torch

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is inference-only (FP8 quantization has no backward), but an input requires grad: "
            "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )
