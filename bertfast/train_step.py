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

Raises, naming the sizes: a batch larger than every bucket, tokens or labels beyond the budget,
a row that is not right-padded (the packing keeps positions 0..n-1 of each row).  Capture is
refused for a model off the GPU and for an optimizer that is not ``capturable``; fp16 loss
scaling needs an optimizer that skips a step on ``found_inf`` itself (``fused=True``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .padding import PackedBatch, StaticPacking, use_static_packing

IGNORE_INDEX = -100
# Labels given per token (ignored at padding) and per sequence (the rows added to reach the bucket's batch).
_TOKEN_LABELS = ("labels",)
_SEQUENCE_LABELS = ("next_sentence_label", "start_positions", "end_positions")


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


class TrainStep:
    """``step(micro_batches)``: one optimizer step over ``accumulation_steps`` micro-batches (see the module).

    ``buckets``: ``(batch, seq)`` shapes (a batch takes the smallest that holds it), or ``None``: one per
    shape seen.  ``token_budget``: packed tokens per micro-batch (``batch * seq`` by default; smaller when
    the data's padding is known).  ``label_budget``: masked-LM labels gathered per micro-batch (the
    token budget by default).  ``max_grad_norm``: clip by the global norm on the device.
    ``loss_scale``: ``None``, a number, or ``"dynamic"`` (fp16: start at 2**16, halve on inf/NaN and
    skip the step, double after 2000 clean steps).  ``capture``: ``"auto"`` (on CUDA), True or False.
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
        capture: bool | str = "auto",
    ):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
        self.model, self.optimizer = model, optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.token_budget, self.label_budget = token_budget, label_budget
        self.buckets = None if buckets is None else sorted(self._bucket(b, s) for b, s in buckets)
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self.device = device
        if capture == "auto":
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"capture=True needs the model on a CUDA device; it is on {device}")
        if capture and not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("capturing the step needs a capturable optimizer, e.g. AdamW(fused=True, capturable=True)")
        self.capture = bool(capture)
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
        prepared, packings = [], []
        for m in micro_batches:
            if any(t.device.type != "cpu" for t in m.values()):
                raise ValueError("TrainStep takes micro-batches on the CPU (it packs them there, with no device read)")
            mask = m.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(m["input_ids"])
            mask = _padded(mask, bucket.batch, bucket.seq, 0)
            inputs = {"attention_mask": mask}
            for name, t in m.items():
                if name == "attention_mask":
                    continue
                if name in _SEQUENCE_LABELS:
                    inputs[name] = _padded(t.reshape(-1), bucket.batch, None, IGNORE_INDEX)
                elif t.dim() == 2 and name not in _TOKEN_LABELS:
                    inputs[name] = _padded(t, bucket.batch, bucket.seq, 0)
                elif t.dim() == 2:  # token labels: none at padding
                    padded = _padded(t, bucket.batch, bucket.seq, IGNORE_INDEX)
                    inputs[name] = padded.masked_fill(mask == 0, IGNORE_INDEX)
                else:
                    inputs[name] = _padded(t, bucket.batch, None, IGNORE_INDEX)
            labels = inputs.get("labels")
            if labels is not None and labels.dim() == 2:
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
        on the bucket's second step, after an eager one on a side stream has built the optimizer state)."""
        static = self._buffers(bucket, prepared, packings)
        if not self.capture:
            return self._body(static).clone()
        if static["graph"] is not None:
            static["graph"].replay()
            return static["loss"].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if static["steps"] == 0:  # warm-up: a real step, run eagerly
                loss = self._body(static)
                static["steps"] += 1
                torch.cuda.current_stream().wait_stream(stream)
                return loss.clone()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static["loss"] = self._body(static)
        static["graph"] = graph
        graph.replay()
        return static["loss"].clone()

    def _body(self, static) -> torch.Tensor:
        """Forward, loss and backward of every micro-batch, then unscale, clip and step: no host read."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, packing in zip(static["inputs"], static["packings"]):
            with use_static_packing(packing):
                loss = self.model(**inputs).loss / self.accumulation_steps
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if "scale" in state:
            self.scale.copy_(state["scale"][0])
            self.growth_tracker.copy_(state["scale"][1])
