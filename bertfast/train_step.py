"""A whole training step (forward, loss, backward, clipping, loss scaling, optimizer) with no host read,
captured as one CUDA graph per shape bucket on a GPU and run eagerly, as the same code, elsewhere.

    step = bertfast.TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True),
                              accumulation_steps=2, max_grad_norm=1.0, buckets=[(32, 128)])
    for micro_batches in loader:            # accumulation_steps dicts of CPU tensors each
        loss = step(micro_batches)          # a device scalar: the step's loss (mean over micro-batches)

Each micro-batch is a dict of ``(batch, seq)`` CPU tensors as the model's forward takes them
(``input_ids``, ``attention_mask``, ``token_type_ids`` and the head's labels: ``labels``,
``next_sentence_label``, ``start_positions``/``end_positions``).  :meth:`TrainStep.prepare`
works on the host (it may run while the previous step runs on the device): it chooses the
smallest bucket ``(batch, seq)`` that holds the batch, pads it to that shape, and packs its
tokens padding-free into the bucket's **token budget** (``batch * seq`` unless given): the real
tokens row-major first, then fill tokens taken from padding positions, grouped into fill
sequences of at most ``seq`` tokens, so the packed offsets (``cu_seqlens``) and every shape are
fixed per bucket and ``max_seqlen`` is the bucket's ``seq``.  Labels at padding become -100.
The masked-LM loss gathers a fixed ``label_budget`` of rows (the labelled ones, the rest
masked out) and divides by the device-side label count.  :meth:`TrainStep.run` copies the
prepared tensors into the bucket's static buffers and runs (or replays) the step.

On CUDA each bucket runs ``warmup_steps`` real steps eagerly on a side stream (they build the
optimizer state and compile and tune the kernels for the bucket's shapes), then the next step is
captured with ``torch.cuda.graph`` and every later one replays it.  The backward in the graph
allocates the gradients from the graph's pool (they are set to ``None`` before capture), so
replays write them where the captured clipping and optimizer step read them.  Dropout seeds are
drawn with ``torch.randint`` on the device inside the graph: the default CUDA generator is
registered with the graph, and each replay advances its philox offset, so replays draw fresh
masks.  Each bucket's graph holds its own gradients and activations (memory per bucket).

Under ``DistributedDataParallel`` the step runs eagerly (``capture=False``): gradients are
all-reduced once, after the last micro-batch (``no_sync`` before it).

Raises, naming the sizes: a batch larger than every bucket, tokens or labels beyond the budget,
a row that is not right-padded (the packing keeps positions 0..n-1 of each row), float labels
(regression, multi-label) in a bucket with more rows than the micro-batch.  Capture is refused
for an optimizer that is not ``capturable``, a learning rate that is not a device tensor (a
float would be frozen into the graph), a ``DistributedDataParallel`` or FSDP model and a model
off the GPU; a step called inside ``torch.autocast`` raises (give ``autocast_dtype``: a captured
forward would keep the region's cached casts of the old weights).  fp16 loss scaling needs an
optimizer that skips a step on ``found_inf`` itself (``fused=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from .fp8 import is_quantized
from .padding import PackedBatch, StaticPacking, use_static_packing

IGNORE_INDEX = -100
# Labels given per token (ignored at padding) and per sequence (the rows added to reach the bucket's batch).
# "labels" is per token where it has the ids' shape and holds class indices (masked or token classification).
_TOKEN_LABELS = ("labels",)
_SEQUENCE_LABELS = ("next_sentence_label", "start_positions", "end_positions")
NUM_ITEMS = "num_items_in_batch"


def _per_token(labels: torch.Tensor, input_ids: torch.Tensor) -> bool:
    return labels.shape == input_ids.shape and not labels.is_floating_point()


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A static shape: ``batch`` rows of ``seq`` positions packed into ``tokens`` tokens, with at most
    ``labels`` masked-LM labels per micro-batch."""

    batch: int
    seq: int
    tokens: int
    labels: int

    @property
    def fill_sequences(self) -> int:
        """Fill sequences after the real ones: enough for a budget of fill tokens, ``seq`` at most each."""
        return math.ceil(self.tokens / self.seq)


def _area(bucket: Bucket) -> tuple[int, int]:
    """Buckets are tried smallest first."""
    return bucket.batch * bucket.seq, bucket.batch


def pack_to_budget(attention_mask: torch.Tensor, bucket: Bucket) -> PackedBatch:
    """The :class:`PackedBatch` of a right-padded ``(batch, seq)`` host mask in ``bucket``'s token budget.

    ``indices``: the real tokens row-major, then padding positions as fill tokens up to ``bucket.tokens``;
    ``cu_seqlens``: the rows, then ``bucket.fill_sequences`` fill sequences (empty ones included).
    """
    keep = attention_mask.bool()
    batch, seq = keep.shape
    lengths = keep.sum(dim=1)
    positions = torch.arange(seq)
    if not torch.equal(keep, positions[None, :] < lengths[:, None]):
        raise ValueError("TrainStep packs right-padded rows: every attention_mask row must be 1s followed by 0s")
    total = int(lengths.sum())
    if total > bucket.tokens:
        raise ValueError(
            f"the batch has {total} tokens but the bucket {bucket.batch} x {bucket.seq} holds a budget of "
            f"{bucket.tokens}: raise token_budget or split the batch"
        )
    fill = bucket.tokens - total
    flat = keep.flatten()
    padding = (~flat).nonzero().squeeze(1)
    if padding.numel() < fill:
        raise ValueError(f"token budget {bucket.tokens} is larger than the bucket's {batch * seq} positions")
    indices = torch.cat((flat.nonzero().squeeze(1), padding[:fill]))
    fill_lengths = [min(bucket.seq, fill - i * bucket.seq) for i in range(bucket.fill_sequences)]
    seqlens = torch.cat((lengths, torch.tensor(fill_lengths).clamp_min(0)))
    cu_seqlens = torch.zeros(seqlens.numel() + 1, dtype=torch.int32)
    torch.cumsum(seqlens, dim=0, out=cu_seqlens[1:])
    return PackedBatch(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=bucket.seq, batch=batch, seq=seq)


def _padded(t: torch.Tensor, batch: int, seq: int | None, value) -> torch.Tensor:
    """``t`` grown to ``batch`` rows (and ``seq`` columns) with ``value``."""
    shape = (batch, seq) if seq is not None else (batch, *t.shape[1:])
    out = torch.full(shape, value, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _check_capturable(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Refuse what a captured step would run wrongly: no host work happens at replay."""
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        raise ValueError("capturing the step needs a capturable optimizer, e.g. AdamW(fused=True, capturable=True)")
    lrs = [group["lr"] for group in optimizer.param_groups]
    if any(not isinstance(lr, torch.Tensor) or lr.device != device for lr in lrs):
        raise ValueError(
            "a captured step would keep a float learning rate fixed in the graph: give lr as a tensor on the "
            "model's device, e.g. lr=torch.tensor(1e-4, device='cuda') (LR schedulers update it in place)"
        )
    distributed = (torch.nn.parallel.DistributedDataParallel,)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        distributed += (FSDPModule,)
    if isinstance(model, distributed):
        # Their gradient communication runs from autograd hooks and host-side bucketing, outside a graph.
        raise ValueError(f"{type(model).__name__} cannot be captured: use capture=False (it runs eagerly)")
    if device.type != "cuda":
        raise ValueError(f"capture=True needs the model on a CUDA device; it is on {device}")


class TrainStep:
    """``step(micro_batches)``: one optimizer step over ``accumulation_steps`` micro-batches (see the module).

    ``buckets``: ``(batch, seq)`` shapes (a batch takes the smallest that holds it), or ``None``: one per
    shape seen.  ``token_budget``: packed tokens per micro-batch (``batch * seq`` by default; smaller when
    the data's padding is known).  ``label_budget``: masked-LM labels gathered per micro-batch (the
    token budget by default).  ``max_grad_norm``: clip by the global norm on the device.
    ``loss_scale``: ``None``, a number, or ``"dynamic"`` (fp16: start at 2**16, halve on inf/NaN and
    skip the step, double after 2000 clean steps).  ``autocast_dtype``: the forwards run under
    ``torch.autocast`` to it (without its weight-cast cache; the backward runs outside).
    ``capture``: ``"auto"`` (on CUDA), True or False; ``warmup_steps``: eager steps of a bucket before
    its capture.  ``num_items_in_batch`` in the micro-batches (a number, the same in each) divides the
    summed loss as the heads do for Trainer, instead of the mean of each micro-batch's mean.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        loss_scale: float | str | None = None,
        buckets=None,
        token_budget: int | None = None,
        label_budget: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        capture: bool | str = "auto",
        warmup_steps: int = 3,
    ):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
        if is_quantized(model):
            raise ValueError(
                "this model is quantized to FP8 (bertfast.quantize), which is inference-only: train the bf16 or fp32 "
                "model and quantize it afterwards"
            )
        self.model, self.optimizer = model, optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.token_budget, self.label_budget = token_budget, label_budget
        self.buckets = None if buckets is None else sorted((self._bucket(b, s) for b, s in buckets), key=_area)
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self.device = device
        if capture == "auto":
            capture = device.type == "cuda"
        if capture:
            _check_capturable(model, optimizer, device)
        self.capture, self.warmup_steps = bool(capture), warmup_steps
        self.autocast_dtype = autocast_dtype
        self.scale = self.growth_tracker = self.found_inf = None
        self.dynamic = loss_scale == "dynamic"
        if loss_scale is not None:
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                raise ValueError("loss_scale needs an optimizer that skips a step on found_inf itself (fused=True)")
            start = 2.0**16 if self.dynamic else float(loss_scale)
            self.scale = torch.full((), start, dtype=torch.float32, device=device)
            self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._static: dict[Bucket, dict] = {}

    # ---------------------------------------------------------------------------- host side

    def _bucket(self, batch: int, seq: int) -> Bucket:
        tokens = self.token_budget or batch * seq
        return Bucket(batch, seq, tokens, self.label_budget or tokens)

    def _bucket_for(self, batch: int, seq: int) -> Bucket:
        if self.buckets is None:
            return self._bucket(batch, seq)
        for bucket in self.buckets:
            if bucket.batch >= batch and bucket.seq >= seq:
                return bucket
        shapes = ", ".join(f"{b.batch} x {b.seq}" for b in self.buckets)
        raise ValueError(f"a {batch} x {seq} batch fits no bucket ({shapes})")

    def prepare(self, micro_batches) -> tuple[Bucket, list[dict], list[StaticPacking]]:
        """Host work of a step: bucket, padding, packing and checks of every micro-batch (no device work)."""
        if isinstance(micro_batches, dict):
            micro_batches = [micro_batches]
        if len(micro_batches) != self.accumulation_steps:
            raise ValueError(f"expected {self.accumulation_steps} micro-batches, got {len(micro_batches)}")
        batch = max(m["input_ids"].shape[0] for m in micro_batches)
        seq = max(m["input_ids"].shape[1] for m in micro_batches)
        bucket = self._bucket_for(batch, seq)
        if len({frozenset(m) for m in micro_batches}) != 1:
            keys = [sorted(m) for m in micro_batches]
            raise ValueError(f"every micro-batch of a step needs the same keys, got {keys}")
        prepared, packings = [], []
        for m in micro_batches:
            if any(t.device.type != "cpu" for t in m.values() if isinstance(t, torch.Tensor)):
                raise ValueError("TrainStep takes micro-batches on the CPU (it packs them there, with no device read)")
            mask = m.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(m["input_ids"])
            mask = _padded(mask, bucket.batch, bucket.seq, 0)
            inputs = {"attention_mask": mask}
            for name, t in m.items():
                if name == "attention_mask":
                    continue
                if name == NUM_ITEMS:  # the step's normaliser (a number): copied in as a device scalar
                    inputs[name] = torch.tensor(float(t), dtype=torch.float32)
                elif name in _TOKEN_LABELS and _per_token(t, m["input_ids"]):  # token labels: none at padding
                    padded = _padded(t, bucket.batch, bucket.seq, IGNORE_INDEX)
                    inputs[name] = padded.masked_fill(mask == 0, IGNORE_INDEX)
                elif name in _TOKEN_LABELS or name in _SEQUENCE_LABELS:
                    if t.is_floating_point() and t.shape[0] != bucket.batch:
                        raise ValueError(
                            f"{name} holds values ({t.dtype}) that rows added to reach the bucket's batch "
                            f"{bucket.batch} cannot ignore (the micro-batch has {t.shape[0]}): give buckets whose "
                            f"batch is the micro-batch's"
                        )
                    flat = t.reshape(-1) if name in _SEQUENCE_LABELS else t
                    inputs[name] = _padded(flat, bucket.batch, None, IGNORE_INDEX)
                elif t.dim() == 2:
                    inputs[name] = _padded(t, bucket.batch, bucket.seq, 0)
                else:
                    raise ValueError(f"TrainStep does not know how to pad {name} of shape {tuple(t.shape)} to a bucket")
            labels = inputs.get("labels")
            if labels is not None and _per_token(labels, mask):
                count = int((labels != IGNORE_INDEX).sum())
                if count > bucket.labels:
                    raise ValueError(
                        f"the micro-batch has {count} masked-LM labels; the label budget is {bucket.labels}"
                    )
            prepared.append(inputs)
            packings.append(StaticPacking(pack_to_budget(mask, bucket), bucket.labels))
        return bucket, prepared, packings

    # ---------------------------------------------------------------------------- device side

    def __call__(self, micro_batches) -> torch.Tensor:
        return self.run(*self.prepare(micro_batches))

    def _buffers(self, bucket: Bucket, prepared, packings) -> dict:
        """The bucket's static device buffers, filled with this step's data (copies only)."""
        static = self._static.get(bucket)
        if static is None:
            inputs = [{k: v.to(self.device) for k, v in m.items()} for m in prepared]
            packs = []
            for p in packings:
                indices, cu_seqlens = p.packed.indices.to(self.device), p.packed.cu_seqlens.to(self.device)
                packed = dataclasses.replace(p.packed, indices=indices, cu_seqlens=cu_seqlens)
                packs.append(StaticPacking(packed, p.label_rows))
            static = self._static[bucket] = {"inputs": inputs, "packings": packs, "graph": None, "steps": 0}
            return static
        for dst, src in zip(static["inputs"], prepared):
            if dst.keys() != src.keys():
                raise ValueError(f"the micro-batch has {sorted(src)}, the bucket was built with {sorted(dst)}")
            for name, t in src.items():
                dst[name].copy_(t, non_blocking=True)
        for dst, src in zip(static["packings"], packings):
            dst.packed.indices.copy_(src.packed.indices, non_blocking=True)
            dst.packed.cu_seqlens.copy_(src.packed.cu_seqlens, non_blocking=True)
        return static

    def run(self, bucket: Bucket, prepared, packings) -> torch.Tensor:
        """Copy a prepared step into its bucket's buffers and run it: eagerly, or its CUDA graph (captured
        after ``warmup_steps`` eager steps on a side stream have built the optimizer state and compiled
        the kernels for the bucket's shapes)."""
        if torch.is_autocast_enabled(self.device.type):
            # A captured forward would keep the enclosing region's cached low-precision weights.
            raise RuntimeError("call TrainStep outside torch.autocast: give TrainStep(autocast_dtype=...) instead")
        static = self._buffers(bucket, prepared, packings)
        if not self.capture:
            return self._body(static).clone()
        if static["graph"] is not None:
            static["graph"].replay()
            return static["loss"].clone()
        if static["steps"] < self.warmup_steps:  # a real step, run eagerly on a side stream
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                loss = self._body(static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            static["steps"] += 1
            return loss.clone()
        graph = torch.cuda.CUDAGraph()
        # The backward inside the graph allocates the gradients from the graph's pool, so every replay
        # writes them at the addresses the captured clipping and optimizer step read.
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static["loss"] = self._body(static)
        static["graph"] = graph
        graph.replay()
        return static["loss"].clone()

    def _micro_batch_sync(self, last: bool):
        """DistributedDataParallel all-reduces the gradients once a step: after the last micro-batch."""
        if last or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _body(self, static) -> torch.Tensor:
        """Forward, loss and backward of every micro-batch, then unscale, clip and step: no host read."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = len(static["inputs"])
        for i, (inputs, packing) in enumerate(zip(static["inputs"], static["packings"])):
            with self._micro_batch_sync(last=i == count - 1):
                with use_static_packing(packing), self._autocast():
                    loss = self.model(**inputs).loss
                if NUM_ITEMS not in inputs:  # each micro-batch's mean: the step's loss is their mean
                    loss = loss / self.accumulation_steps
                (loss * self.scale if self.scale is not None else loss).backward()
            total += loss.detach().float()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.scale is not None:
            self.found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())
            # As torch.amp.GradScaler does: a fused optimizer reads these and skips the step on found_inf.
            self.optimizer.grad_scale, self.optimizer.found_inf = None, self.found_inf
        if self.max_grad_norm is not None:
            foreach = self.device.type == "cuda" or None
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=foreach)
        self.optimizer.step()
        if self.dynamic:
            torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)
        return total

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: a captured graph must recast the weights the optimizer updated.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Model, optimizer, loss scale and generator states: loading it resumes the run bit for bit."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "cpu_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.scale is not None:
            state["scale"] = (self.scale.clone(), self.growth_tracker.clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict`.  Captured graphs are dropped (the optimizer's state tensors are new):
        each bucket warms up and is captured again."""
        self._static.clear()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if "scale" in state:
            self.scale.copy_(state["scale"][0])
            self.growth_tracker.copy_(state["scale"][1])
