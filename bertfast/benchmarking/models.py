"""Model-level cases: BERT forward (inference) and a training step, bertfast against Hugging Face.

    impl                  what runs
    bertfast              bertfast.BertModel, backend="auto" (the best backend per op)
    bertfast-<backend>    bertfast.BertModel on one backend ("triton", "ext", "reference")
    hf-eager              transformers.BertModel, attn_implementation="eager"
    hf-sdpa               transformers.BertModel, attn_implementation="sdpa"
    hf-compile            the hf-sdpa model with each encoder layer torch.compile'd (regional
                          compilation: one compiled layer serves all 24, so compiling takes
                          seconds rather than minutes; the embeddings and pooler stay eager)

All share one set of weights: a float32 bertfast model (random, seeded, or a checkpoint)
whose ``state_dict`` is loaded into the Hugging Face models and cast to the benchmark
dtype.  Dropout is off everywhere.  Inputs are padded batches (see
:data:`bertfast.benchmarking.shapes.PADDING_DISTRIBUTION`) with their attention masks.

- forward: ``model(input_ids, attention_mask, token_type_ids)`` under ``torch.no_grad()``;
  ``max_error`` is the max abs error of ``last_hidden_state`` at real tokens against the
  float32 model on the reference backend (TF32 off).
- train: ``zero_grad``; forward; ``last_hidden_state.backward(g)`` with a random ``g``;
  ``AdamW.step()`` (fused on a GPU) over parameters in the benchmark dtype.  Each
  implementation trains its own copy of the weights.

``peak_mem_mb`` is the implementation's own parameters (plus optimizer state when
training) plus the most memory the timed calls allocated beyond what was allocated
before them, so models kept side by side on the device do not count against each other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from .. import ops
from ..config import BertConfig
from ..modeling import BertModel
from . import formulas
from .cases import Case, Skip, compile_backend, compile_note, unavailable
from .device import DTYPES
from .shapes import ModelShape, key_padding_mask, model_label, padded_lengths

MODEL_IMPLS = ("bertfast", "bertfast-triton", "bertfast-ext", "bertfast-reference", "hf-eager", "hf-sdpa", "hf-compile")
HF_IMPLS = ("hf-eager", "hf-sdpa", "hf-compile")


def backend_of(impl: str) -> str | None:
    """The bertfast backend an impl runs on (``"auto"`` for ``bertfast``); None for Hugging Face."""
    if impl == "bertfast":
        return "auto"
    if impl.startswith("bertfast-"):
        return impl.removeprefix("bertfast-")
    return None


def bertfast_impls() -> tuple[str, ...]:
    return ("bertfast",) + tuple(f"bertfast-{name}" for name in ops.BACKENDS)


def transformers_reason() -> str | None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers is not installed ({exc})"
    return None


def hf_config(config: BertConfig, attn_implementation: str):
    import transformers

    return transformers.BertConfig(**config.to_dict(), attn_implementation=attn_implementation)


@contextlib.contextmanager
def exact_fp32():
    """No TF32 in float32 matmuls (the reference must be the exact one)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


class ModelBench:
    """One set of weights, every implementation built from it, and the inputs they share."""

    def __init__(
        self,
        config: BertConfig | None = None,
        device: torch.device | str = "cpu",
        *,
        checkpoint: str | None = None,
        seed: int = 0,
        smoke: bool = False,
    ):
        self.device = torch.device(device)
        self.compiler = compile_backend(self.device, smoke)
        loaded = None
        if checkpoint is not None:
            loaded = BertModel.from_pretrained(checkpoint, backend="reference", dtype=torch.float32, device=self.device)
            config = loaded.config
        elif config is None:
            raise ValueError("give a config or a checkpoint")
        # Dropout off: the fused kernels and every baseline then compute the same function.
        config = dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(seed)
        with torch.device(self.device):
            master = BertModel(config, backend="reference")
        if loaded is not None:
            master.load_state_dict(loaded.state_dict())
            del loaded
        self.config = config
        self.master = master.eval().requires_grad_(False)
        self.label = model_label(config)
        self.seed = seed
        self._models: dict[tuple, torch.nn.Module] = {}
        self._inputs: dict[tuple, list[tuple]] = {}
        self._reference: dict[tuple, torch.Tensor] = {}

    # -- implementations ------------------------------------------------------------
    def skip_reason(self, impl: str) -> str | None:
        backend = backend_of(impl)
        if backend is not None:
            return None if backend == "auto" else ops.backend_availability(backend)  # unknown names raise
        if impl not in HF_IMPLS:
            raise ValueError(f"unknown model implementation {impl!r}; choose from {MODEL_IMPLS}")
        return transformers_reason()

    def _weights_in(self, dtype: str) -> BertModel:
        """The master weights cast to ``dtype`` (one copy per dtype, shared by the backends)."""
        key = ("bertfast", dtype)
        if key not in self._models:
            self._models[key] = copy.deepcopy(self.master).to(DTYPES[dtype])
        return self._models[key]

    def bertfast_model(self, dtype: str, backend: str, *, fresh: bool = False) -> BertModel:
        """A bertfast model on ``backend``; unless ``fresh``, it shares the dtype's weights."""
        base = self._weights_in(dtype)
        if fresh:
            model = copy.deepcopy(base)
        else:
            # A module tree of its own (its backend is per instance) over the same tensors.
            shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
            model = copy.deepcopy(base, memo=shared)
        return model.set_backend(backend)

    def hf_model(self, dtype: str, attn_implementation: str, *, fresh: bool = False) -> torch.nn.Module:
        key = ("hf", dtype, attn_implementation)
        if fresh or key not in self._models:
            import transformers

            with torch.device(self.device):
                model = transformers.BertModel(hf_config(self.config, attn_implementation))
            model.load_state_dict(self.master.state_dict())
            model = model.to(DTYPES[dtype]).eval().requires_grad_(False)
            if fresh:
                return model
            self._models[key] = model
        return self._models[key]

    def hf_compiled(self, dtype: str, *, fresh: bool = False) -> torch.nn.Module:
        key = ("hf-compile", dtype)
        if fresh or key not in self._models:
            model = self.hf_model(dtype, "sdpa", fresh=True)
            for layer in model.encoder.layer:
                layer.compile(backend=self.compiler)
            if fresh:
                return model
            self._models[key] = model
        return self._models[key]

    def forward_fn(self, impl: str, dtype: str, *, fresh: bool = False):
        """``(module, f(input_ids, attention_mask, token_type_ids) -> last_hidden_state)``."""
        backend = backend_of(impl)
        if backend is not None:
            model = self.bertfast_model(dtype, backend, fresh=fresh)
            return model, lambda ids, mask, types: model(ids, mask, types).last_hidden_state
        if impl == "hf-compile":
            model = self.hf_compiled(dtype, fresh=fresh)
        else:
            model = self.hf_model(dtype, impl.removeprefix("hf-"), fresh=fresh)
        return (
            model,
            lambda ids, mask, types: model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
        )

    # -- inputs and the reference ---------------------------------------------------
    def inputs(self, shape: ModelShape, count: int = 3) -> list[tuple]:
        """``count`` padded batches ``(input_ids, attention_mask, token_type_ids)`` (seeded per shape)."""
        key = (shape.batch, shape.seq)
        have = self._inputs.setdefault(key, [])
        generator = torch.Generator().manual_seed(self.seed * 1000003 + shape.batch * 1009 + shape.seq + len(have))
        while len(have) < count:
            lengths = padded_lengths(shape.batch, shape.seq, generator)
            keep = key_padding_mask(lengths, shape.seq)
            ids = torch.randint(1, self.config.vocab_size, (shape.batch, shape.seq), generator=generator)
            ids = ids.masked_fill(~keep, self.config.pad_token_id)
            # Two segments, as in sentence-pair tasks: the second half of each real sequence is type 1.
            types = ((torch.arange(shape.seq)[None, :] >= (lengths[:, None] // 2)) & keep).long()
            types = types.clamp(max=self.config.type_vocab_size - 1)
            have.append(tuple(t.to(self.device) for t in (ids, keep.long(), types)))
        return have[:count]

    def reference_output(self, shape: ModelShape) -> torch.Tensor:
        """float32 ``last_hidden_state`` of the first input set, on the reference backend."""
        key = (shape.batch, shape.seq)
        if key not in self._reference:
            ids, mask, types = self.inputs(shape, 1)[0]
            with torch.no_grad(), exact_fp32():
                self._reference[key] = self.master(ids, mask, types).last_hidden_state
        return self._reference[key]

    def compare(self, forward, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s output and the reference's at real tokens (``(tokens, hidden)`` each)."""
        ids, mask, types = self.inputs(shape, 1)[0]
        with torch.no_grad():
            out = forward(ids, mask, types)
        keep = mask.bool()
        return out[keep], self.reference_output(shape)[keep]

    def error_of(self, forward, shape: ModelShape) -> float:
        """Max abs error of ``forward``'s output at real tokens against the reference."""
        out, ref = self.compare(forward, shape)
        return (out.float() - ref).abs().max().item() if out.numel() else 0.0

    # -- cases ----------------------------------------------------------------------
    def _note(self, impl: str) -> str | None:
        return compile_note(self.compiler) if impl == "hf-compile" else None

    def forward_case(self, impl: str, dtype: str, shape: ModelShape, input_sets: int = 3) -> Case:
        reason = self.skip_reason(impl)
        if reason is not None:
            raise Skip(reason)
        model, forward = self.forward_fn(impl, dtype)

        def timed(ids, mask, types):
            with torch.no_grad():
                forward(ids, mask, types)

        config = self.config
        return Case(
            name=f"{self.label}-fwd",
            impl=impl,
            dtype=dtype,
            batch=shape.batch,
            seq=shape.seq,
            device=self.device,
            fn=timed,
            input_sets=self.inputs(shape, input_sets),
            flops=formulas.bert_forward_flops(
                shape.batch, shape.seq, config.hidden_size, config.num_hidden_layers, config.intermediate_size
            ),
            shape=shape.label,
            max_error=lambda: self.error_of(forward, shape),
            resident_bytes=_parameter_bytes(model),
            note=self._note(impl),
        )

    def train_case(self, impl: str, dtype: str, shape: ModelShape, input_sets: int = 3) -> Case:
        reason = self.skip_reason(impl)
        if reason is not None:
            raise Skip(reason)
        model, forward = self.forward_fn(impl, dtype, fresh=True)
        model.train().requires_grad_(True)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused or None)
        generator = torch.Generator().manual_seed(self.seed + 7)
        sets = []
        for ids, mask, types in self.inputs(shape, input_sets):
            grad = torch.randn(ids.shape + (self.config.hidden_size,), generator=generator) * 1e-3
            sets.append((ids, mask, types, grad.to(self.device, DTYPES[dtype])))

        def step(ids, mask, types, grad):
            optimizer.zero_grad(set_to_none=True)
            forward(ids, mask, types).backward(grad)
            optimizer.step()

        def first_step_works():
            # Runs the whole step once (so an unsupported backward shows up before timing).
            try:
                step(*sets[0])
            except Exception as exc:
                if unavailable(exc):
                    raise
                raise RuntimeError(f"{impl} training step failed: {type(exc).__name__}: {exc}") from exc
            return None

        config = self.config
        return Case(
            name=f"{self.label}-train",
            impl=impl,
            dtype=dtype,
            batch=shape.batch,
            seq=shape.seq,
            device=self.device,
            fn=step,
            input_sets=sets,
            flops=formulas.bert_train_flops(
                shape.batch, shape.seq, config.hidden_size, config.num_hidden_layers, config.intermediate_size
            ),
            shape=shape.label,
            max_error=first_step_works,
            resident_bytes=lambda: _parameter_bytes(model) + _optimizer_bytes(optimizer),
            note=self._note(impl),
        )

    def release(self) -> None:
        """Drop every model copy (the master stays)."""
        self._models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
