"""FP8 (e4m3) inference: the four GEMMs of every encoder layer on FP8 operands.

    bertfast.quantize(model, "fp8")                          # round-to-nearest weights
    bertfast.quantize(model, "fp8", calibration=batches)     # error-compensated weights (GPTQ-style)

What runs (``bertfast.layers.layer_fp8``)::

    qkv = [x]8 @ [Wq; Wk; Wv]8^T + b       x's FP8 copy comes from the previous LayerNorm (or, before
    a   = attention(qkv)                    the first layer, quantize_rows of the embeddings); attention in bf16
    y   = [a]8 @ Wo8^T                      quantize_rows of the attention output
    x   = LN(y + bo + x), [x]8              layer_norm_fp8: bf16 output and its FP8 copy, one pass
    g8  = [gelu(x8 @ Wi8^T + bi)]8          bias_gelu_fp8 writes only the FP8 copy
    x   = LN(g8 @ Wf8^T + bf + x), [x]8

Every product ``[a]8 @ W8^T`` is ``torch._scaled_mm`` with fp32 accumulation, one scale per row of
the activation (per token) and one per output channel of the weight, and a bf16 output.

Scales and outliers.  A per-token scale maps each row's largest magnitude to e4m3's largest value
(448); a per-channel scale does the same for each weight row.  e4m3 is a floating format: every
value down to 1/28,672 of its row's largest (e4m3's normal range, 2^-6 to 448) is a normal number
with the same 3-bit relative precision, so a token whose row holds an outlier feature (BERT has a
few channels tens to hundreds of times larger than the rest) keeps its ordinary channels at full
FP8 precision, and per-token (not per-tensor) scales keep one token's outlier from setting the
others' scales.  What no scale changes: each product's rounding error is relative to the product,
so the outlier channels' products dominate every output's error (on a test model with 100x
outliers the ordinary channels' error grows from 0.9 % to 2.2 %; tests/test_fp8.py).  The largest
error is the weights' rounding (about 2/3 of the total on all-MiniLM-L6-v2), which ``calibration``
reduces: each GEMM's input second moments, collected on the caller's batches, let each weight
column's rounding error be compensated in the columns not yet rounded (GPTQ).

The quantized model is inference-only and holds ordinary tensors: each quantized ``nn.Linear``
keeps its ``weight`` parameter, now ``float8_e4m3fn`` (no gradient), and a ``weight_scale`` buffer
(fp32, one per output channel); everything else is cast to bf16.  ``state_dict``, ``safetensors``,
``deepcopy`` and ``.to(device)`` work; loading a non-FP8 weight into it, ``.train()``, gradients, a
dtype change of the FP8 weights (``.half()``, ``.to(dtype)``), ``save_pretrained`` of a native model and
``bertfast.unpatch`` are refused with the reason.  (transformers' own ``save_pretrained`` of a patched
model is not ours to refuse: its checkpoint holds the FP8 weights and their scales, which only a
model quantized the same way can load, through ``load_state_dict``.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import BackendUnavailable

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
COMPUTE_DTYPE = torch.bfloat16
SCALE_BUFFER = "weight_scale"
PRECISIONS = ("fp8",)
# The GEMM's layout rules on a GPU (cuBLASLt FP8): both inner and output sizes multiples of 16.
GPU_SIZE_MULTIPLE = 16


# --------------------------------------------------------------------------------------
# Where FP8 can run
# --------------------------------------------------------------------------------------


@functools.cache
def _probe(device: torch.device) -> str | None:
    """Whether this torch runs the product the layers run (row-wise scales, a bf16 bias, bf16 out) on
    ``device``: the one honest answer (the CPU in torch 2.13 does; GPUs by generation and build)."""
    try:
        a = torch.zeros((16, 16), dtype=FP8_DTYPE, device=device)
        scale = torch.ones((16, 1), device=device)
        bias = torch.zeros(16, dtype=COMPUTE_DTYPE, device=device)
        torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t(), bias=bias, out_dtype=COMPUTE_DTYPE)
    except Exception as exc:  # the reason, for the user
        where = "the CPU" if device.type == "cpu" else str(device)
        return f"torch {torch.__version__} cannot run row-wise-scaled FP8 matrix products on {where} ({exc})"
    return None


def unsupported(device) -> str | None:
    """Why FP8 inference cannot run on ``device`` with this torch, or None."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no FP8 matrix product (torch._scaled_mm)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return f"FP8 e4m3 matrix products need an Ada or Hopper GPU (sm_89+); {name} is sm_{major}{minor}"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _probe(torch.device("cuda", index))
    if device.type == "cpu":
        return _probe(device)
    return f"FP8 inference runs on CUDA GPUs (sm_89+) and the CPU, not on {device.type}"


# --------------------------------------------------------------------------------------
# The GEMM
# --------------------------------------------------------------------------------------


def is_fp8_linear(linear: nn.Module) -> bool:
    return SCALE_BUFFER in linear._buffers


def check_fp8_linear(linear: nn.Module, layer: int, name: str) -> None:
    """Raise if a quantized Linear (``layer``'s ``name``) no longer holds FP8 weights and fp32 scales
    (``.half()``, ``.to(dtype)``)."""
    weight, scale = linear._parameters["weight"], linear._buffers[SCALE_BUFFER]
    if weight.dtype != FP8_DTYPE or scale.dtype != torch.float32:
        raise TypeError(
            f"layer {layer}'s {name} holds a {weight.dtype} weight with {scale.dtype} scales, not "
            f"{FP8_DTYPE} with float32 ones: a .half(), .float() or .to(dtype) converted the FP8 model's weights, "
            "which drops their scales' meaning. Move a quantized model with .to(device) only; to change its "
            "precision, quantize the original weights again"
        )


def fp8_linear(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None):
    """``(q * scale) @ (weight * weight_scale)^T + bias`` in bf16: ``q`` (rows, K) e4m3 with ``scale``
    (rows, 1) fp32; ``weight`` (N, K) e4m3 with ``weight_scale`` (N,) fp32; ``bias`` (N,) bf16 or None."""
    if q.device.type == "cuda":
        k, n = q.shape[-1], weight.shape[0]
        if k % GPU_SIZE_MULTIPLE or n % GPU_SIZE_MULTIPLE:
            raise ValueError(
                f"FP8 matrix products on a GPU need sizes that are multiples of {GPU_SIZE_MULTIPLE}; this GEMM "
                f"is {k} -> {n}"
            )
    return torch._scaled_mm(
        q,
        weight.t(),
        scale_a=scale,
        scale_b=weight_scale.view(1, -1),
        bias=bias,
        out_dtype=COMPUTE_DTYPE,
    )


# --------------------------------------------------------------------------------------
# Weights: round to nearest, or error-compensated from calibration statistics
# --------------------------------------------------------------------------------------


def _e4m3(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """One fp32 scale per output channel (row): its largest magnitude maps to 448 (1 for a zero row)."""
    amax = weight.abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / FP8_MAX, 1.0)


def quantize_weight(weight: torch.Tensor, second_moment: torch.Tensor | None = None, damping: float = 0.01):
    """``(q, scale)`` of ``weight`` (N, K): e4m3 values and one fp32 scale per output channel.

    ``second_moment``: ``E[x x^T]`` (K, K) of the GEMM's inputs, or None (round to nearest).  With it the
    columns are rounded one at a time and each one's error is spread over the columns not yet rounded so
    that the error of ``x @ W^T`` on such inputs is least (GPTQ, Frantar et al. 2022): columns with the
    largest inputs first, in blocks of 128, with ``damping`` times the mean diagonal added for stability.
    On all-MiniLM-L6-v2 it cuts the gap of the sentence embeddings' cosine to fp32 by about half."""
    scale = _channel_scales(weight)
    if second_moment is None:
        return _e4m3(weight.float() / scale[:, None]), scale
    w = weight.double() / scale.double()[:, None]  # in e4m3 units: the rounding is to the e4m3 grid
    h = second_moment.double().clone()
    dead = h.diagonal() == 0  # inputs that were always 0: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * h.diagonal().mean())
    # Columns with the largest inputs first (GPTQ's act-order): their errors get the most columns to absorb them.
    order = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, order], h[order][:, order]
    # The upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, 128):
        end = min(start + 128, columns)
        block, errors, u_block = w[:, start:end].clone(), torch.empty_like(w[:, start:end]), u[start:end, start:end]
        for i in range(end - start):
            rounded = _e4m3(block[:, i].float()).double()
            q[:, start + i] = rounded
            errors[:, i] = (block[:, i] - rounded) / u_block[i, i]
            block[:, i:] -= errors[:, i : i + 1] * u_block[i : i + 1, i:]
        w[:, end:] -= errors @ u[start:end, end:]
    q = q[:, torch.argsort(order)]
    return q.float().to(FP8_DTYPE), scale


class _GemmInputs(TorchFunctionMode):
    """Accumulates ``sum x^T x`` and the row count of the inputs of each group of :func:`_gemm_groups`:
    a ``F.linear`` with a single-Linear group's weight, or with the concatenation of a group's weights
    (the layers' one-GEMM QKV projection, which concatenates right before its ``F.linear``)."""

    def __init__(self, groups: Iterable[tuple[nn.Linear, ...]]):
        super().__init__()
        self.groups = {tuple(id(linear.weight) for linear in group): group for group in groups}
        self.latest_cat = None  # (the concatenated weights, their group)
        self.moments: dict[tuple, list] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.cat and args:
            group = self.groups.get(tuple(map(id, args[0])))
            if group is not None:
                self.latest_cat = (result, group)
        elif func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            if self.latest_cat is not None and weight is self.latest_cat[0]:
                group = self.latest_cat[1]
            else:
                group = self.groups.get((id(weight),))
            if group is not None:
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                entry = self.moments.setdefault(group, [0.0, 0])
                entry[0] = entry[0] + rows.t() @ rows
                entry[1] += rows.shape[0]
        return result


def _run_calibration(model: nn.Module, calibration) -> None:
    if callable(calibration):
        calibration()
        return
    for batch in calibration:
        if isinstance(batch, Mapping):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


# A layer's GEMM Linears, by name in bertfast.family.LayerParts.
GEMMS = ("query", "key", "value", "attention_dense", "intermediate", "output_dense")


def layer_gemms(parts) -> tuple[nn.Linear, ...]:
    """The Linears of :data:`GEMMS` in a layer's ``LayerParts``."""
    return tuple(getattr(parts, name) for name in GEMMS)


def _gemm_groups(bert) -> list[tuple[nn.Linear, ...]]:
    """Every layer's GEMM Linears grouped by the rows they read: query, key and value together (one GEMM
    in the layers, one set of input statistics, quantized as one weight), then one group each."""
    from .family import encoder_layers, layer_parts_function

    parts_of = layer_parts_function(bert)
    groups = []
    for layer in encoder_layers(bert):
        query, key, value, *others = layer_gemms(parts_of(layer))
        groups += [(query, key, value), *((linear,) for linear in others)]
    return groups


def _layers_linears(bert) -> list[nn.Linear]:
    return [linear for group in _gemm_groups(bert) for linear in group]


def encoders_of(model: nn.Module) -> list[nn.Module]:
    """The base models (native, or transformers models patched by ``bertfast.patch``) inside ``model``."""
    from .modeling import BertModel
    from .patching import _find_encoders, is_patched

    natives = [m for m in model.modules() if isinstance(m, BertModel)]
    targets, _ = _find_encoders(model)
    unpatched = [path or type(module).__name__ for path, module, _ in targets if not is_patched(module)]
    if unpatched:
        raise ValueError(
            f"{', '.join(unpatched)} is not patched: FP8 runs in bertfast's layers, so call bertfast.patch(model) "
            "before bertfast.quantize(model, 'fp8')"
        )
    found = natives + [bert for _, _, bert in targets]
    if not found:
        raise ValueError(f"no BERT-family encoder found in this {type(model).__name__} to quantize")
    return found


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or an encoder in it) holds FP8 encoder weights."""
    return any(isinstance(m, nn.Linear) and is_fp8_linear(m) for m in model.modules())


def _refuse_non_fp8_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    """``load_state_dict`` pre-hook of a quantized Linear: a non-FP8 weight would be copied into the FP8
    parameter value by value, without its scale (a silently wrong model)."""
    weight = state_dict.get(prefix + "weight")
    if weight is not None and weight.dtype != FP8_DTYPE:
        state_dict.pop(prefix + "weight")  # load_state_dict's own copy: the refused weight is not copied in
        errors.append(
            f"{prefix}weight is {weight.dtype} but this model was quantized to FP8 (its weights are "
            f"{FP8_DTYPE} with a {SCALE_BUFFER}): load an FP8 state dict saved from a quantized model, or load these "
            "weights into an unquantized model and quantize it"
        )
    elif weight is not None and prefix + SCALE_BUFFER not in state_dict:
        errors.append(f"{prefix}weight is FP8 but {prefix}{SCALE_BUFFER} is missing: the weights mean nothing without")


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    training = model.training
    model.eval()
    try:
        from .cuda_graphs import graphs_enabled

        with torch.no_grad(), graphs_enabled(False):
            yield
    finally:
        model.train(training)


def quantize(
    model: nn.Module,
    precision: str = "fp8",
    *,
    calibration: Iterable | Callable[[], object] | None = None,
    damping: float = 0.01,
) -> nn.Module:
    """Quantize ``model``'s encoder GEMM weights to FP8 in place (see the module docstring); returns it.

    ``model``: a native bertfast model, or one holding transformers BERT-family models patched by
    :func:`bertfast.patch` (a SentenceTransformer, a CrossEncoder, a pipeline's model).
    ``calibration``: None (weights rounded to nearest), or batches (dicts of the model's inputs, or
    tuples of positional ones) run through the model before quantization, or a function that runs the
    model on calibration data (``lambda: st_model.encode(texts)``); their GEMM inputs' statistics give
    error-compensated weights.  The pooler and the heads stay in bf16.

    Raises :class:`BackendUnavailable` where this device or torch cannot run FP8, ValueError for a model
    that is not native or patched, or already quantized."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    encoders = encoders_of(model)
    if is_quantized(model):
        raise ValueError("this model is already quantized to FP8")
    device = next(encoders[0].parameters()).device
    reason = unsupported(device)
    if reason is not None:
        raise BackendUnavailable(f"FP8 inference cannot run here: {reason}")
    groups = [group for bert in encoders for group in _gemm_groups(bert)]
    for linear in (linear for group in groups for linear in group):
        if linear.weight.device != device:
            raise ValueError(f"the encoder's weights are on {linear.weight.device} and {device}: one device, please")
    moments = {}
    if calibration is not None:
        recorder = _GemmInputs(groups)
        with _eval_no_grad(model), recorder:
            _run_calibration(model, calibration)
        if not recorder.moments:
            raise ValueError("the calibration ran no forward through the encoder's layers: no statistics to use")
        moments = {group: total / count for group, (total, count) in recorder.moments.items()}
    with torch.no_grad():
        quantized = []
        for group in groups:  # rows are rounded independently: a group's concatenated weight is its weights'
            weight = torch.cat([linear.weight for linear in group]) if len(group) > 1 else group[0].weight
            q, scale = quantize_weight(weight, moments.get(group), damping)
            sizes = [linear.weight.shape[0] for linear in group]
            quantized += zip(group, q.split(sizes), scale.split(sizes))
        model.to(COMPUTE_DTYPE)  # before the FP8 weights exist: to(dtype) would convert them too
        for linear, weight, scale in quantized:  # clones: no storage shared between parameters
            linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
            linear.register_buffer(SCALE_BUFFER, scale.clone())
            linear._register_load_state_dict_pre_hook(_refuse_non_fp8_load, with_module=True)
        model.requires_grad_(False)  # inference-only: a forward outside no_grad builds no graph
    model.eval()
    return model
