"""CUDA graphs for BERT inference.

**The default path** (nothing to wire): a bertfast model or a patched transformers model on
CUDA, in eval mode, called without autograd (``torch.no_grad``/``inference_mode``, as pipelines
and sentence-transformers' ``encode``/``CrossEncoder.predict`` do), runs its encoder padding-free
inside a CUDA graph per token-budget bucket (:mod:`bertfast.buckets`): the batch's real tokens
are packed into the bucket's static inputs with ``cu_seqlens`` (filler tokens in sequences of
their own), the graph of the embeddings and every layer (``layers.bucket_encoder``) replays,
and the real rows are copied out and scattered back on the device; the pooler and the heads run
after it as they do eagerly, so every output is the eager path's, cropped to the input.  The
forward's one host read (the ids' ranges and the packed sizes, which choose the bucket) happens
before the replay; the captured part reads nothing back.

- Buckets: ``tokens`` four steps per octave from 64 to 32768, ``max_seqlen`` the padded length
  rounded up to a power of two, ``sequences`` a power of two.  A bucket is captured on its first
  batch (two warm-up forwards on a side stream, then the capture), at most
  ``MAX_GRAPHS_PER_MODEL`` (64) per model; all of a model's graphs share one memory pool, so
  their memory is about the largest bucket's activations plus each bucket's static output
  ``(tokens, hidden)``.  A batch above 32768 tokens, or of a new bucket once the budget is
  spent, runs eagerly, said once in a warning.
- Eager instead, never a different answer: training, autograd on, autocast on, ``unpad=False``,
  ``inputs_embeds``, ``output_hidden_states``, left-padded batches where a pooler or first-token
  head reads position 0, under ``torch.compile`` or inside another capture, and encoders with
  forward hooks on a module the forward calls (``layers.modules_called``) or parameters that are
  not plain tensors (FSDP shards).
- ``bertfast.set_graphs(False)`` turns it off.  Moved or replaced parameters recapture.

**CUDAGraphRunner** (explicit, padded): capture once per (batch, sequence) bucket, then replay.

    runner = bertfast.CUDAGraphRunner(model)               # model: bertfast, or a patched transformers BERT
    out = runner(input_ids, attention_mask, token_type_ids)  # same output type as model(...)

A forward pass of a small batch launches hundreds of kernels; at batch 1-8 the CPU time to
launch them exceeds the GPU time to run them.  A CUDA graph records the launches once and
replays them with one call.  Graphs have fixed shapes, so inputs are padded up to a
*bucket*: the smallest ``batch_buckets`` entry >= batch and the smallest ``seq_buckets``
entry >= seq.  Padding is masked out (``attention_mask`` 0, ``input_ids`` the pad token,
``token_type_ids`` 0), so valid positions do not see it: every valid output equals the eager
forward on the padded inputs bit for bit (the same kernels run on the same data; bertfast
models run their padded path in a graph, never the data-dependent unpadded one), and
equals the eager forward on the unpadded inputs up to rounding (GEMMs over a different
number of rows may sum in a different order).  Outputs are cropped back to the real batch
and sequence length and cloned out of the graph's static memory.

Cropping rule: every tensor output is cropped to the real batch along dim 0; along dim 1
(the sequence) when it has rank >= 3 (``last_hidden_state``, ``hidden_states``, token-level
``logits``) or is a per-token field of rank 2 (``start_logits``, ``end_logits``).  Other
rank-2 outputs (``pooler_output``, sequence-level ``logits``) are per sequence.

Requirements, each checked with a clear error: a CUDA model and CUDA inputs; eval mode (the
graphs are inference-only, run under ``torch.no_grad``); a bertfast model or a transformers
BERT patched with :func:`bertfast.patch` (Hugging Face's own forward reads mask values back to
the host while building its 4-D mask, which a graph cannot capture).  If the model's
parameters are moved or reallocated (``model.to(...)``, ``load_state_dict(assign=True)``),
the graphs are recaptured; in-place weight updates are seen by the graphs directly.
Labels/losses are not supported (inference only).  Graph memory is shared by all buckets
through one memory pool.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import warnings
import weakref

import torch
from torch import nn

from . import buckets

__all__ = ["CUDAGraphRunner", "check_inputs", "choose_bucket", "crop_outputs", "pad_inputs", "set_graphs"]

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SEQ_BUCKETS = (16, 32, 64, 128, 256, 384, 512)

# Rank-2 outputs that are per token, (batch, seq): cropped along dim 1 too.
PER_TOKEN_RANK2_FIELDS = ("start_logits", "end_logits")


# Parameter (re)registrations anywhere in the process (``module.weight = Parameter(...)``,
# ``load_state_dict(assign=True)``): when the count moves, a runner walks its model once again.
_REGISTRATIONS = [0]


def _count_registration(module, name, param) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


class ParameterWatch:
    """Whether a model's parameters were moved or replaced since the last look, per call without
    walking the module tree: the addresses of the parameters seen last (one C-level pass), and a
    full walk only after a parameter was registered somewhere."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)  # a watch never keeps its model alive
        self.snapshot()

    @property
    def model(self) -> nn.Module:
        return self._model()

    def snapshot(self) -> None:
        self._registrations = _REGISTRATIONS[0]
        self._params = tuple(self.model.parameters())
        self._addresses = tuple(map(torch.Tensor.data_ptr, self._params))

    def changed(self) -> bool:
        if _REGISTRATIONS[0] != self._registrations:
            self._registrations = _REGISTRATIONS[0]
            current = tuple(self.model.parameters())
            if len(current) != len(self._params) or any(a is not b for a, b in zip(current, self._params)):
                return True
        return tuple(map(torch.Tensor.data_ptr, self._params)) != self._addresses


def _check_buckets(name: str, buckets) -> tuple[int, ...]:
    values = tuple(buckets)
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {buckets!r}")
    return tuple(sorted(set(values)))


def choose_bucket(batch: int, seq: int, batch_buckets, seq_buckets) -> tuple[int, int]:
    """The smallest ``(batch_bucket, seq_bucket)`` that holds a ``(batch, seq)`` input."""
    batch_buckets = _check_buckets("batch_buckets", batch_buckets)
    seq_buckets = _check_buckets("seq_buckets", seq_buckets)
    if batch < 1 or seq < 1:
        raise ValueError(f"CUDA graphs need a non-empty input, got batch {batch} and sequence length {seq}")
    i = bisect.bisect_left(batch_buckets, batch)
    j = bisect.bisect_left(seq_buckets, seq)
    if i == len(batch_buckets):
        raise ValueError(f"batch {batch} is larger than the largest batch bucket ({batch_buckets[-1]})")
    if j == len(seq_buckets):
        raise ValueError(f"sequence length {seq} is longer than the largest sequence bucket ({seq_buckets[-1]})")
    return batch_buckets[i], seq_buckets[j]


def pad_inputs(input_ids, attention_mask, token_type_ids, bucket: tuple[int, int], pad_token_id: int = 0, out=None):
    """Pad ``(batch, seq)`` inputs to ``bucket``: ids with ``pad_token_id``, mask and token types with 0.

    ``attention_mask``/``token_type_ids`` may be None (all tokens / type 0).  With ``out``
    (three tensors of the bucket's shape) the inputs are written into them in place (the
    graph's static inputs); otherwise new tensors are returned.  The mask comes back in
    ``input_ids``' integer dtype unless ``out`` says otherwise.
    """
    batch, seq = input_ids.shape
    bucket_batch, bucket_seq = bucket
    if batch > bucket_batch or seq > bucket_seq:
        raise ValueError(f"input of shape {(batch, seq)} does not fit bucket {bucket}")
    if out is None:
        device = input_ids.device
        mask_dtype = input_ids.dtype if attention_mask is None else attention_mask.dtype
        out = (
            torch.empty(bucket, dtype=input_ids.dtype, device=device),
            torch.empty(bucket, dtype=mask_dtype, device=device),
            torch.empty(bucket, dtype=input_ids.dtype, device=device),
        )
    ids_out, mask_out, types_out = out
    ids_out.fill_(pad_token_id)
    ids_out[:batch, :seq].copy_(input_ids)
    mask_out.zero_()
    if attention_mask is None:
        mask_out[:batch, :seq].fill_(1)
    else:
        mask_out[:batch, :seq].copy_(attention_mask)
    types_out.zero_()
    if token_type_ids is not None:
        types_out[:batch, :seq].copy_(token_type_ids)
    return out


def _crop_tensor(t: torch.Tensor, batch: int, seq: int, per_token: bool, clone: bool) -> torch.Tensor:
    t = t[:batch]
    if per_token:
        t = t[:, :seq]
    return t.clone() if clone else t


def crop_outputs(outputs, batch: int, seq: int, clone: bool = True):
    """Crop a model's outputs at a bucket back to ``(batch, seq)`` by the rule in the module docstring.

    Works on dataclass outputs (bertfast's and Hugging Face's), tuples and lists, and tensors.
    """

    def crop(value, field=None):
        if isinstance(value, torch.Tensor):
            per_token = value.dim() >= 3 or (value.dim() == 2 and field in PER_TOKEN_RANK2_FIELDS)
            return _crop_tensor(value, batch, seq, per_token, clone)
        if isinstance(value, (tuple, list)):
            return type(value)(crop(v, field) for v in value)
        return value

    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        changes = {f.name: crop(getattr(outputs, f.name), f.name) for f in dataclasses.fields(outputs) if f.init}
        return type(outputs)(**changes)
    return crop(outputs)


def check_inputs(input_ids, attention_mask, token_type_ids, device: torch.device) -> None:
    """Types, shapes and devices of a runner's inputs: CUDA tensors on ``device``, all ``(batch, seq)``."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need CUDA tensors; {name} is on {t.device}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
        if name != "attention_mask" and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    outputs: object


class CUDAGraphRunner:
    """Run a BERT model's inference forward through CUDA graphs, one per (batch, seq) bucket.

    ``model``: a bertfast model, or a transformers BERT patched with :func:`bertfast.patch`,
    on a CUDA device, in eval mode.  ``seq_buckets`` defaults to ``DEFAULT_SEQ_BUCKETS``
    below the model's ``max_position_embeddings``, plus that length (at most 512).  Call
    the runner like the model with ``input_ids``, ``attention_mask`` and ``token_type_ids``
    (all ``(batch, seq)``, on the model's device); the result has the model's output type,
    cropped to the input's batch and length.
    Graphs are captured on first use of a bucket (or ahead of time with :meth:`capture`).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_buckets=DEFAULT_BATCH_BUCKETS,
        seq_buckets=None,
        pad_token_id: int | None = None,
        warmup_iters: int = 2,
        clone_outputs: bool = True,
    ):
        from .modeling import BertPreTrainedModel
        from .patching import is_patched

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._native = isinstance(model, BertPreTrainedModel)
        if not self._native and not is_patched(model):
            raise TypeError(
                f"{type(model).__name__} is neither a bertfast model nor patched by bertfast.patch: Hugging Face's own "
                "forward reads the mask back to the host, which a CUDA graph cannot capture; call bertfast.patch(model)"
            )
        self.model = model
        self._device = self._model_device()
        max_positions = model.config.max_position_embeddings
        if seq_buckets is None:  # the defaults, clipped to what the model can take
            seq_buckets = [b for b in DEFAULT_SEQ_BUCKETS if b < max_positions] + [min(512, max_positions)]
        self.batch_buckets = _check_buckets("batch_buckets", batch_buckets)
        self.seq_buckets = _check_buckets("seq_buckets", seq_buckets)
        if self.seq_buckets[-1] > max_positions:
            raise ValueError(
                f"seq bucket {self.seq_buckets[-1]} is longer than the model's "
                f"max_position_embeddings ({max_positions})"
            )
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None) or 0
        self.pad_token_id = int(pad_token_id)
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1 (kernels compile and autotune there), got {warmup_iters}")
        self.warmup_iters = int(warmup_iters)
        self.clone_outputs = bool(clone_outputs)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._parameters_watch = ParameterWatch(model)

    # -- checks --------------------------------------------------------------------
    def _model_device(self) -> torch.device:
        devices = {p.device for p in self.model.parameters()}
        if len(devices) != 1:
            raise ValueError(f"the model's parameters must be on one CUDA device, found {sorted(map(str, devices))}")
        device = devices.pop()
        if device.type != "cuda":
            raise RuntimeError(
                f"CUDA graphs need a model on a CUDA device; its parameters are on {device} (model.to('cuda') first)"
            )
        return device

    def _check_inputs(self, input_ids, attention_mask, token_type_ids) -> None:
        if self.model.training:
            raise RuntimeError("CUDA graphs here are for inference: call model.eval() first")
        if self._parameters_watch.changed():
            # The graphs read parameters at the addresses they were captured with.
            self.reset()
            self._device = self._model_device()
            self._parameters_watch.snapshot()
        check_inputs(input_ids, attention_mask, token_type_ids, self._device)

    # -- capture and replay --------------------------------------------------------
    def reset(self) -> None:
        """Drop every captured graph (and the memory they hold)."""
        self._graphs.clear()
        self._pool = None

    @property
    def captured_buckets(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def _call_model(self, ids, mask, types):
        if self._native:
            return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_dict=True)

    def capture(self, batch: int, seq: int, mask_dtype: torch.dtype = torch.long) -> tuple[int, int]:
        """Capture the graph of the bucket holding ``(batch, seq)`` now; returns the bucket."""
        bucket = choose_bucket(batch, seq, self.batch_buckets, self.seq_buckets)
        if bucket in self._graphs:
            return bucket
        if self.model.training:
            raise RuntimeError("CUDA graphs here are for inference: call model.eval() first")
        device = self._device
        static = (
            torch.full(bucket, self.pad_token_id, dtype=torch.long, device=device),
            torch.zeros(bucket, dtype=mask_dtype, device=device),
            torch.zeros(bucket, dtype=torch.long, device=device),
        )
        static[1][:, 0] = 1  # a valid first token per row, so warm-up sees a realistic mask
        with padded_forward(self.model), torch.no_grad(), torch.cuda.device(device):
            # Warm up on a side stream: lazy initialisation, kernel compilation and
            # autotuning must happen before capture, never inside it.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self._call_model(*static)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self._call_model(*static)
        self._graphs[bucket] = _Graph(graph=graph, inputs=static, outputs=outputs)
        return bucket

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        batch, seq = input_ids.shape
        bucket = choose_bucket(batch, seq, self.batch_buckets, self.seq_buckets)
        entry = self._graphs.get(bucket)
        if entry is None:
            mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
            self.capture(batch, seq, mask_dtype=mask_dtype)
            entry = self._graphs[bucket]
        if attention_mask is not None and attention_mask.dtype != entry.inputs[1].dtype:
            attention_mask = attention_mask.to(entry.inputs[1].dtype)
        pad_inputs(input_ids, attention_mask, token_type_ids, bucket, self.pad_token_id, out=entry.inputs)
        entry.graph.replay()
        return crop_outputs(entry.outputs, batch, seq, clone=self.clone_outputs)


@contextlib.contextmanager
def padded_forward(model: torch.nn.Module):
    """bertfast models and patched encoders may unpad (data-dependent shapes): graphs always run the
    padded path, the warm-up too (so the padded kernels are compiled and tuned before the capture).
    Inside, every such module of ``model`` runs padded; on exit each gets its own mode back."""
    from .modeling import BertModel
    from .patching import _UNPAD_ATTR

    saved = []
    for m in model.modules():
        attr = "unpad" if isinstance(m, BertModel) and hasattr(m, "unpad") else _UNPAD_ATTR
        if hasattr(m, attr):
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, False)
    try:
        yield
    finally:
        for m, attr, mode in saved:
            setattr(m, attr, mode)


# --------------------------------------------------------------------------------------
# The default inference path: padding-free batches in token-budget buckets, one graph each
# --------------------------------------------------------------------------------------

MAX_GRAPHS_PER_MODEL = 64
WARMUP_ITERS = 2
_GRAPHS = {"enabled": True, "capture": True}
_MODEL_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_graphs(enabled: bool) -> None:
    """Turn the bucketed CUDA-graph inference path on (the default) or off, for every model."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_graphs takes True or False, got {enabled!r}")
    _GRAPHS["enabled"] = enabled


@contextlib.contextmanager
def graphs_enabled(enabled: bool):
    """:func:`set_graphs` ``(enabled)`` inside the block only (a benchmark's eager twin of a graph row)."""
    saved = _GRAPHS["enabled"]
    set_graphs(enabled)
    try:
        yield
    finally:
        _GRAPHS["enabled"] = saved


@contextlib.contextmanager
def bucketed_eager():
    """Inside, the bucketed path serves every device and runs eagerly: the very function a graph
    captures, run in its place (how the CPU tests check it)."""
    saved = dict(_GRAPHS)
    _GRAPHS.update(enabled=True, capture=False)
    try:
        yield
    finally:
        _GRAPHS.update(saved)


def serves(bert: nn.Module, device: torch.device) -> bool:
    """Whether a forward of ``bert`` on ``device`` may take the bucketed path: graphs on, eval mode,
    no autograd, and (when capturing) CUDA without autocast, not inside someone else's capture."""
    if not _GRAPHS["enabled"] or bert.training or torch.is_grad_enabled():
        return False
    if not _GRAPHS["capture"]:
        return True
    return (
        device.type == "cuda" and not torch.is_autocast_enabled("cuda") and not torch.cuda.is_current_stream_capturing()
    )


class _ModelGraphs:
    """One model's buckets: their static batches and graphs (or, not capturing, their eager function)."""

    def __init__(self, model: nn.Module):
        self.watch = ParameterWatch(model)
        self.warned: set[str] = set()
        self.refresh(model)

    def refresh(self, model: nn.Module) -> None:
        """A fresh start, also after parameters moved or were replaced: no graph is valid any more."""
        from .layers import modules_called

        self.entries: dict = {}
        self.pool = None
        self.watch.snapshot()
        self.plain = _plain_parameters(model)
        self.called = modules_called(model)

    def warn_once(self, reason: str, message: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(message, stacklevel=4)


def bucketed_encoder(bert, packed, input_ids, token_type_ids, position_ids, ops, dtype, parts_of):
    """``layers.bucket_encoder`` of the batch ``packed`` describes, in its bucket: the packed output rows
    ``(packed.total, hidden)`` (a copy, out of the graph's memory), or None when no bucket serves it
    (too many tokens, or the model's graph budget is spent; each said once in a warning)."""
    graphs = _MODEL_GRAPHS.get(bert)
    if graphs is None:
        graphs = _MODEL_GRAPHS[bert] = _ModelGraphs(bert)
    elif graphs.watch.changed():  # the graphs read parameters at the addresses they were captured with
        graphs.refresh(bert)
    if not graphs.plain or _hooked(graphs.called):
        return None
    bucket = buckets.choose_bucket(packed.total, packed.batch, packed.seq, bert.config.max_position_embeddings)
    if bucket is None:
        graphs.warn_once("tokens", f"a batch of more than {buckets.MAX_BUCKET_TOKENS} tokens runs eagerly (no bucket)")
        return None
    capture = _GRAPHS["capture"]
    key = (bucket, dtype, ops, input_ids.device, capture)
    entry = graphs.entries.get(key)
    if entry is None:
        if len(graphs.entries) >= MAX_GRAPHS_PER_MODEL:
            graphs.warn_once(
                "budget",
                f"{MAX_GRAPHS_PER_MODEL} bucket graphs captured for this model: batches of new buckets run eagerly",
            )
            return None
        # Ordinary tensors even under inference_mode: later calls outside it refill them in place.
        with torch.inference_mode(False), torch.no_grad():
            pad_token_id = getattr(bert.config, "pad_token_id", None) or 0
            static = buckets.StaticPackedBatch(bucket, input_ids.device, pad_token_id)
            static.fill(packed, input_ids, token_type_ids, position_ids)
            run = functools.partial(_bucket_encoder, weakref.ref(bert), static, ops, dtype, parts_of)
            if capture:
                if graphs.pool is None:
                    graphs.pool = torch.cuda.graph_pool_handle()
                entry = (static, *_capture(run, graphs.pool))
            else:
                entry = (static, run, None)
        graphs.entries[key] = entry
    else:
        entry[0].fill(packed, input_ids, token_type_ids, position_ids)
    _, replay, output = entry
    result = replay()
    return (result if output is None else output)[: packed.total].clone()


def _plain_parameters(model: nn.Module) -> bool:
    """Not DTensor shards or other subclasses, whose layout a replay could not follow."""
    return all(type(p) in (torch.Tensor, nn.Parameter) for p in model.parameters())


def _hooked(modules) -> bool:
    """Whether a forward hook would run in ``modules`` (those the captured forward calls: a replay runs no
    Python, so it would not; FSDP gathers its shards in one).  Checked per call: hooks come and go."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    # accelerate's hooks (device maps, offloading) wrap the forward instead and mark the module with _hf_hook
    return any(m._forward_hooks or m._forward_pre_hooks or "_hf_hook" in m.__dict__ for m in modules)


def _bucket_encoder(bert_ref, static, ops, dtype, parts_of):
    from .layers import bucket_encoder

    return bucket_encoder(bert_ref(), static, ops, dtype, parts_of)


def _capture(run, pool):
    """``(graph.replay, static output)`` of ``run()`` captured after a warm-up on a side stream
    (lazy initialisation, Triton compilation and autotuning happen there, never inside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_ITERS):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph.replay, output
