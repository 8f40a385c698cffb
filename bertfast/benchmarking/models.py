"""Model-level cases: BERT forward (inference) and a training step, bertfast against Hugging Face.

    impl                     what runs
    bertfast                 bertfast.BertModel, backend="auto" (the best backend per op), padding-free
                             mode "auto" (unpads when the batch has padding); "True" in the varlen rows;
                             on CUDA in eval the bucketed CUDA-graph path (bertfast.cuda_graphs), the default
    bertfast-eager           bertfast with the bucketed CUDA graphs off (set_graphs(False)): its eager twin
    bertfast-<backend>       bertfast.BertModel on one backend ("triton", "ext", "reference")
    bertfast-padded          bertfast, backend="auto", set_unpad(False): every layer computes the padding
    bertfast-cudagraph       bertfast (auto) in eval, replayed by bertfast.CUDAGraphRunner with one bucket
                             of exactly the batch's shape (GPU only: the runner refuses the CPU)
    bertfast-amp             bertfast with float32 weights under torch.autocast (training rows)
    hf-eager                 transformers.BertModel (with a checkpoint: its own class, e.g. RobertaModel),
                             attn_implementation="eager"
    hf-sdpa                  transformers.BertModel, attn_implementation="sdpa"
    bertfast-triton-padded   bertfast on the Triton backend, set_unpad(False): the padded path
    hf-compile               the hf-sdpa model with each encoder layer torch.compile'd (regional
                             compilation: one compiled layer serves all 24, so compiling takes
                             seconds rather than minutes; the embeddings and pooler stay eager);
                             fullgraph, once per shape (dynamic=False), with a Dynamo cache of its
                             own per model, and the row fails if a call ran eagerly
    hf-sdpa-patched          the hf-sdpa model after bertfast.patch(model) (the drop-in path: Hugging
                             Face's modules and weights, bertfast's compute)
    hf-sdpa-patched-compile  torch.compile(dynamic=True) of the whole patched model (graph breaks
                             allowed; the row fails if the model's own forward ran eagerly)
    hf-sdpa-amp              hf-sdpa with float32 weights under torch.autocast: how Hugging Face models
                             are usually trained (fp32 master weights and AdamW state, bf16 compute)
    hf-compile-amp           hf-compile with float32 weights under torch.autocast
    bertfast-trainstep       bertfast.TrainStep over the bertfast task model (task rows only): one CUDA
                             graph of the row's bucket (batch x seq, token budget batch * seq), replayed, on
                             a GPU; the same code run eagerly on the CPU.  Its host packing and copy-in are
                             inside the timed call
    bertfast-trainstep-amp   bertfast-trainstep over float32 weights, TrainStep(autocast_dtype=...)
    bertfast-fp8             bertfast (auto, padding-free, the bucketed CUDA graphs on CUDA eval) after
                             bertfast.quantize(model, "fp8"): the four GEMMs of each layer in e4m3 with
                             row-wise scales (round-to-nearest weights), everything else in bf16; inference
                             only, its rows always bf16; refused with bertfast.fp8.unsupported(device)'s reason

All share one set of weights: a float32 bertfast model (random, seeded, or a checkpoint)
whose ``state_dict`` is loaded into the Hugging Face models and cast to the benchmark
dtype (float32 for the ``-amp`` impls, whose row dtype is the autocast dtype).  Forward
rows run in eval mode (no dropout); training steps use dropout 0.1 on hidden states and
attention probabilities (``TRAIN_DROPOUT``, BERT's own), fused into the kernels by bertfast.
Inputs are padded batches (see :data:`bertfast.benchmarking.shapes.PADDING_DISTRIBUTION`)
with their attention masks; the padding-free rows (``<model>-fwd-varlen``,
``<model>-train-varlen``) draw their lengths from
:data:`bertfast.benchmarking.shapes.LENGTH_DISTRIBUTIONS` and count the real work only.

- forward: ``model(input_ids, attention_mask, token_type_ids)`` under ``torch.no_grad()``;
  ``max_error`` is the max abs error of ``last_hidden_state`` at real tokens against the
  float32 model on the reference backend (TF32 off).
- train: ``zero_grad``; forward; ``last_hidden_state.backward(g)`` with a random ``g``
  that is zero at padding positions (a loss over real tokens); ``AdamW.step()`` (fused on
  a GPU) over the parameters.  Each implementation trains its own copy of the weights.
  The ``-amp`` impls run the forward under ``torch.autocast`` and the backward after it.
- task train (``<model>-mlm-train``, ``<model>-cls-train``): a whole task model with its labels and loss
  (masked-LM pre-training; sequence classification, the fine-tuning step), backward, AdamW:
  bertfast.TrainStep next to the eager step and Hugging Face, each in one dtype policy.

``peak_mem_mb`` is the implementation's own parameters (plus optimizer state when
training, plus the graph pool for ``bertfast-cudagraph``) plus the most memory the timed
calls allocated beyond what was allocated before them (gradients included), so models
kept side by side on the device do not count against each other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import zlib
from collections.abc import Callable

import torch

from .. import ops
from ..config import BertConfig
from ..cuda_graphs import graphs_enabled
from ..modeling import BertForMaskedLM, BertForSequenceClassification, BertModel
from . import formulas
from .cases import Case, CompiledFunction, Skip, check_all_compiled, compile_backend, compile_note, unavailable
from .device import DTYPES
from .shapes import LengthDistribution, ModelShape, key_padding_mask, model_label, padded_lengths, varlen_lengths

# BERT's dropout rate (hidden and attention), used by every training-step row.
TRAIN_DROPOUT = 0.1

MODEL_IMPLS = ("bertfast", "bertfast-triton", "bertfast-ext", "bertfast-reference", "hf-eager", "hf-sdpa", "hf-compile")
HF_IMPLS = ("hf-eager", "hf-sdpa", "hf-compile")
# Forward rows at the standard shapes: Hugging Face patched in place, and CUDA-graph replay.
DROP_IN_IMPLS = ("hf-sdpa-patched", "hf-sdpa-patched-compile", "bertfast-cudagraph")
# Training rows with float32 master weights under torch.autocast.
AMP_IMPLS = ("bertfast-amp", "hf-sdpa-amp", "hf-compile-amp")
# Padding-free rows: bertfast unpadded ("bertfast"), the same model computing the padding, Hugging Face.
VARLEN_IMPLS = ("bertfast", "bertfast-padded", "hf-sdpa")
# Task training-step rows (``<model>-<task>-train``): bertfast.TrainStep, the eager step, Hugging Face; pure
# low precision, and AMP (float32 master weights under torch.autocast).
TASK_IMPLS = ("bertfast-trainstep", "bertfast", "hf-sdpa")
TASK_AMP_IMPLS = ("bertfast-trainstep-amp", "bertfast-amp", "hf-sdpa-amp")
# task -> (bertfast class, transformers class name, seed of its head): MLM pre-training and a fine-tuning step.
TASK_MODELS = {
    "mlm": (BertForMaskedLM, "BertForMaskedLM", 11),
    "cls": (BertForSequenceClassification, "BertForSequenceClassification", 17),
}
# BERT's masking rate: the share of real tokens that carry a label.
MLM_LABELLED_FRACTION = 0.15


@dataclasses.dataclass(frozen=True)
class ImplSpec:
    """How an implementation name is built (see the module docstring)."""

    family: str  # "bertfast" or "hf"
    backend: str = "auto"  # bertfast
    attention: str = "sdpa"  # hf: attn_implementation
    unpad: bool | str = "auto"  # bertfast: set_unpad mode
    compiled: bool = False  # hf: regional compile; patched: the whole model
    patched: bool = False  # hf: bertfast.patch(model)
    cuda_graph: bool = False  # bertfast: CUDAGraphRunner
    amp: bool = False  # float32 weights under torch.autocast
    train_step: bool = False  # bertfast.TrainStep (task training rows only)
    graphs: bool = True  # bertfast: the bucketed CUDA-graph inference path (the default on CUDA eval)
    fp8: bool = False  # bertfast: bertfast.quantize(model, "fp8"), inference only


# bertfast rows that run padding-free on a ragged batch (the default, its eager twin, the FP8 model).
PADDING_FREE_IMPLS = ("bertfast", "bertfast-eager", "bertfast-fp8")
# The FP8 inference model: its rows' dtype whatever the section's (non-GEMM work and activations in bf16).
FP8_IMPL, FP8_ROW_DTYPE = "bertfast-fp8", "bf16"
# The FP8 rows, interleaved: FP8 against our bf16 default (on CUDA eval the bucketed graph path) and Hugging Face.
FP8_IMPLS = (FP8_IMPL, "bertfast", "hf-sdpa")
# Issue 25's throughput target for the FP8 model: MLPerf Inference v3.1, BERT-99 offline on SQuAD v1.1 (max 384),
# one H100, sequences/s.
MLPERF_OFFLINE_SEQ_PER_S = 9100.0

IMPLS = {
    "bertfast": ImplSpec("bertfast"),
    "bertfast-padded": ImplSpec("bertfast", unpad=False),
    # The default's eager twin: the same padding-free forward without the bucketed CUDA graphs.
    "bertfast-eager": ImplSpec("bertfast", graphs=False),
    "bertfast-triton-padded": ImplSpec("bertfast", backend="triton", unpad=False),
    # The runner always replays the padded path (graphs need fixed shapes); eager warm-up matches it.
    "bertfast-cudagraph": ImplSpec("bertfast", unpad=False, cuda_graph=True),
    "bertfast-amp": ImplSpec("bertfast", amp=True),
    "hf-eager": ImplSpec("hf", attention="eager"),
    "hf-sdpa": ImplSpec("hf"),
    "hf-compile": ImplSpec("hf", compiled=True),
    "hf-sdpa-patched": ImplSpec("hf", patched=True),
    "hf-sdpa-patched-compile": ImplSpec("hf", patched=True, compiled=True),
    "hf-sdpa-amp": ImplSpec("hf", amp=True),
    "hf-compile-amp": ImplSpec("hf", compiled=True, amp=True),
    "bertfast-trainstep": ImplSpec("bertfast", train_step=True),
    "bertfast-trainstep-amp": ImplSpec("bertfast", amp=True, train_step=True),
    FP8_IMPL: ImplSpec("bertfast", fp8=True),
}


def fp8_reason(device: torch.device | str) -> str | None:
    """Why the FP8 model cannot run on ``device`` (``bertfast.fp8.unsupported``), or None."""
    from .. import fp8

    reason = fp8.unsupported(torch.device(device))
    return None if reason is None else f"FP8 refused: {reason}"


def impl_spec(impl: str) -> ImplSpec:
    """The spec of ``impl``: a name in :data:`IMPLS` or ``bertfast-<backend>`` for any registered backend."""
    if impl in IMPLS:
        return IMPLS[impl]
    backend = impl.removeprefix("bertfast-")
    if impl.startswith("bertfast-") and backend in ops.BACKENDS:
        return ImplSpec("bertfast", backend=backend)
    known = sorted({*IMPLS, *(f"bertfast-{name}" for name in ops.BACKENDS)})
    raise ValueError(f"unknown model implementation {impl!r}; choose from {known}")


def backend_of(impl: str) -> str | None:
    """The bertfast backend of a plain bertfast impl (``"auto"`` for ``bertfast``); None otherwise."""
    if impl == "bertfast":
        return "auto"
    if impl.startswith("bertfast-") and impl.removeprefix("bertfast-") in ops.BACKENDS:
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


def _shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A module tree of its own over the same parameter and buffer tensors."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _under_autocast(forward: Callable, device: torch.device, dtype: torch.dtype) -> Callable:
    def run(*args):
        with torch.autocast(device.type, dtype=dtype):
            return forward(*args)

    return run


def _run_layer(layer: torch.nn.Module, *args, **kwargs):
    """One encoder layer's own forward (the body each ``hf-compile`` model compiles once)."""
    return type(layer).forward(layer, *args, **kwargs)


def _run_model(model: torch.nn.Module, *args, **kwargs):
    return model(*args, **kwargs)


class _CompiledModel(torch.nn.Module):
    """``model`` called through a :class:`CompiledFunction` (the whole-model compile of a row)."""

    def __init__(self, model: torch.nn.Module, compiled: CompiledFunction):
        super().__init__()
        self.model = model
        self._bench_compiled = [compiled]

    def forward(self, *args, **kwargs):
        return self._bench_compiled[0](self.model, *args, **kwargs)


def compiled_functions(module: torch.nn.Module) -> list[CompiledFunction]:
    """The :class:`CompiledFunction` objects a benchmark model runs through (empty if it is not compiled)."""
    return list(getattr(module, "_bench_compiled", ()))


def _compiled_check(module: torch.nn.Module):
    functions = compiled_functions(module)
    return check_all_compiled(functions) if functions else None


TRAIN_LR = 1e-5


def _adamw(model: torch.nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer of every training row: AdamW, fused on the GPU.  ``capturable`` (TrainStep's graph on
    the GPU): the learning rate a device tensor and the step count on the device, so nothing is frozen."""
    device = next(model.parameters()).device
    if capturable and device.type == "cuda":
        lr = torch.tensor(TRAIN_LR, device=device)
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
    return torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, fused=device.type == "cuda" or None)


def train_recipe(impl: str, dtype: str, capturable: bool = False) -> str:
    """The recipe a training row states: optimizer, learning rate, dtype policy (compare rows of one policy)."""
    if impl_spec(impl).amp:
        policy = f"AMP: fp32 master weights and optimizer state, {dtype} autocast"
    else:
        policy = f"pure {dtype}: weights, gradients and optimizer state in {dtype}"
    optimizer = "AdamW (capturable: lr a device tensor) lr" if capturable else "AdamW lr"
    return f"recipe: {optimizer} {TRAIN_LR:g}; {policy}"


def _first_steps(what: str, run: Callable[[], object]) -> None:
    """Run a row's first training steps before timing, so an unsupported backward (or capture) shows up
    here, named."""
    try:
        run()
    except Exception as exc:
        if unavailable(exc):
            raise
        raise RuntimeError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


@dataclasses.dataclass
class Built:
    """An implementation ready to run: ``forward(ids, mask, types) -> last_hidden_state``."""

    module: torch.nn.Module  # whose parameters are this implementation's weights
    forward: Callable
    runner: object | None = None  # the CUDAGraphRunner of bertfast-cudagraph


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
        train_dropout: float = TRAIN_DROPOUT,
    ):
        self.device = torch.device(device)
        self.compiler = compile_backend(self.device, smoke)
        loaded = None
        if checkpoint is not None:
            loaded = BertModel.from_pretrained(checkpoint, backend="reference", dtype=torch.float32, device=self.device)
            config = loaded.config
        elif config is None:
            raise ValueError("give a config or a checkpoint")
        # Forward rows run in eval mode (no dropout: every implementation computes the same
        # function); training steps run with dropout at ``train_dropout``, as BERT trains.
        config = dataclasses.replace(
            config, hidden_dropout_prob=train_dropout, attention_probs_dropout_prob=train_dropout
        )
        torch.manual_seed(seed)
        with torch.device(self.device):
            master = BertModel(config, backend="reference")
        if loaded is not None:
            master.load_state_dict(loaded.state_dict())
            del loaded
        self.config = config
        self.checkpoint = checkpoint
        self.master = master.eval().requires_grad_(False)
        self.label = model_label(config)
        self.seed = seed
        self._models: dict[tuple, torch.nn.Module] = {}
        self._inputs: dict[tuple, list[tuple]] = {}
        self._reference: dict[tuple, torch.Tensor] = {}
        self._task_states: dict[str, dict[str, torch.Tensor]] = {}

    # -- implementations ------------------------------------------------------------
    def skip_reason(self, impl: str) -> str | None:
        spec = impl_spec(impl)  # unknown names raise
        if spec.cuda_graph and self.device.type != "cuda":
            return "CUDA graphs need a CUDA device (bertfast.CUDAGraphRunner refuses CPU tensors)"
        if spec.fp8:
            return fp8_reason(self.device)
        if spec.family == "bertfast":
            return None if spec.backend == "auto" else ops.backend_availability(spec.backend)
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
        model = copy.deepcopy(base) if fresh else _shared_copy(base)  # the backend is per instance
        return model.set_backend(backend)

    def fp8_model(self, *, fresh: bool = False) -> BertModel:
        """The master weights quantized by ``bertfast.quantize(model, "fp8")`` (round-to-nearest weights from the
        float32 master; the rest cast to bf16 by quantize), backend auto, in eval: one copy, kept."""
        key = ("bertfast-fp8",)
        if fresh or key not in self._models:
            from ..errors import BackendUnavailable

            reason = self.skip_reason(FP8_IMPL)
            if reason is not None:
                raise BackendUnavailable(reason)
            from .. import quantize

            model = copy.deepcopy(self.master).set_backend("auto").eval().requires_grad_(False)
            quantize(model, "fp8")
            if fresh:
                return model
            self._models[key] = model
        return self._models[key]

    def hf_model(self, dtype: str, attn_implementation: str, *, fresh: bool = False) -> torch.nn.Module:
        key = ("hf", dtype, attn_implementation)
        if fresh or key not in self._models:
            import transformers

            if self.checkpoint is not None:
                # The folder's own class (RoBERTa, ELECTRA, ...) and weights: a BertModel built from a
                # family's converted config would compute another function (RoBERTa's positions).
                dropout = {k: getattr(self.config, k) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
                model = transformers.AutoModel.from_pretrained(
                    self.checkpoint, attn_implementation=attn_implementation, dtype=torch.float32, **dropout
                ).to(self.device)
            else:
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
            # One compiled function per model (its own Dynamo cache: models of other dtypes or modes do not
            # count against its recompile limit), shared by its layers; fullgraph, one graph per shape.
            compiled = CompiledFunction(_run_layer, backend=self.compiler, dynamic=False, name="hf-compile layer")
            for layer in model.encoder.layer:
                layer.forward = functools.partial(compiled, layer)
            model._bench_compiled = [compiled]
            if fresh:
                return model
            self._models[key] = model
        return self._models[key]

    def hf_patched(self, dtype: str, *, compiled: bool = False, fresh: bool = False) -> torch.nn.Module:
        """The hf-sdpa model after ``bertfast.patch`` (strict: a model left unpatched would time Hugging Face)."""
        from ..patching import patch

        key = ("hf-patched", dtype, compiled)
        if fresh or key not in self._models:
            # Patching sets a per-instance forward: patch a module tree of its own, never the hf-sdpa one.
            model = self.hf_model(dtype, "sdpa", fresh=True) if fresh else _shared_copy(self.hf_model(dtype, "sdpa"))
            patch(model, strict=True)
            if compiled:
                # dynamic=True: one graph for every batch size and length, as a server would compile it (shapes
                # that a custom op's fake implementation specializes still recompile).
                compiled = CompiledFunction(
                    _run_model, backend=self.compiler, dynamic=True, fullgraph=False, name="hf-sdpa-patched-compile"
                )
                model = _CompiledModel(model, compiled)
            if fresh:
                return model
            self._models[key] = model
        return self._models[key]

    def build(
        self,
        impl: str,
        dtype: str,
        *,
        fresh: bool = False,
        unpad: bool | str | None = None,
        shape: ModelShape | None = None,
    ) -> Built:
        """``impl`` computing in ``dtype``.  ``unpad`` overrides a bertfast impl's padding-free mode;
        ``shape`` sizes the CUDA graph bucket of ``bertfast-cudagraph`` (exactly that shape)."""
        spec = impl_spec(impl)
        if spec.train_step:
            raise ValueError(f"{impl} is a training step of a task model: see task_train_case")
        weights = "fp32" if spec.amp else dtype
        runner = None
        if spec.family == "bertfast":
            if spec.fp8:
                model = self.fp8_model(fresh=fresh)
            else:
                model = self.bertfast_model(weights, spec.backend, fresh=fresh)
            model.set_unpad(spec.unpad if unpad is None else unpad)
            if spec.cuda_graph:
                from ..cuda_graphs import CUDAGraphRunner

                buckets = {} if shape is None else {"batch_buckets": (shape.batch,), "seq_buckets": (shape.seq,)}
                runner = CUDAGraphRunner(model, **buckets)

                def forward(ids, mask, types):
                    return runner(ids, mask, types).last_hidden_state

            else:

                def forward(ids, mask, types):
                    with graphs_enabled(spec.graphs):
                        return model(ids, mask, types).last_hidden_state

        else:
            if spec.patched:
                model = self.hf_patched(weights, compiled=spec.compiled, fresh=fresh)
            elif spec.compiled:
                model = self.hf_compiled(weights, fresh=fresh)
            else:
                model = self.hf_model(weights, spec.attention, fresh=fresh)

            def forward(ids, mask, types):
                return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

        if spec.amp:
            forward = _under_autocast(forward, self.device, DTYPES[dtype])
        return Built(model, forward, runner)

    def forward_fn(self, impl: str, dtype: str, *, fresh: bool = False):
        """``(module, f(input_ids, attention_mask, token_type_ids) -> last_hidden_state)``."""
        built = self.build(impl, dtype, fresh=fresh)
        return built.module, built.forward

    # -- inputs and the reference ---------------------------------------------------
    def inputs(self, shape: ModelShape, count: int = 3, lengths: LengthDistribution | None = None) -> list[tuple]:
        """``count`` padded batches ``(input_ids, attention_mask, token_type_ids)`` (seeded per shape).

        ``lengths``: draw the sequence lengths from this distribution (the padding-free
        rows) instead of :data:`~bertfast.benchmarking.shapes.PADDING_DISTRIBUTION`.
        """
        key = (shape.batch, shape.seq, None if lengths is None else lengths.name)
        have = self._inputs.setdefault(key, [])
        salt = 0 if lengths is None else zlib.crc32(lengths.name.encode())  # stable across processes
        generator = torch.Generator().manual_seed(
            self.seed * 1000003 + shape.batch * 1009 + shape.seq + len(have) + salt
        )
        while len(have) < count:
            if lengths is None:
                seq_lengths = padded_lengths(shape.batch, shape.seq, generator)
            else:
                seq_lengths = varlen_lengths(lengths, shape.batch, shape.seq, generator)
            keep = key_padding_mask(seq_lengths, shape.seq)
            ids = torch.randint(1, self.config.vocab_size, (shape.batch, shape.seq), generator=generator)
            ids = ids.masked_fill(~keep, self.config.pad_token_id)
            # Two segments, as in sentence-pair tasks: the second half of each real sequence is type 1.
            types = ((torch.arange(shape.seq)[None, :] >= (seq_lengths[:, None] // 2)) & keep).long()
            types = types.clamp(max=self.config.type_vocab_size - 1)
            have.append(tuple(t.to(self.device) for t in (ids, keep.long(), types)))
        return have[:count]

    def reference_output(self, shape: ModelShape, lengths: LengthDistribution | None = None) -> torch.Tensor:
        """float32 ``last_hidden_state`` of the first input set, on the reference backend."""
        key = (shape.batch, shape.seq, None if lengths is None else lengths.name)
        if key not in self._reference:
            ids, mask, types = self.inputs(shape, 1, lengths)[0]
            with torch.no_grad(), exact_fp32():
                self._reference[key] = self.master(ids, mask, types).last_hidden_state
        return self._reference[key]

    def compare(
        self, forward, shape: ModelShape, lengths: LengthDistribution | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s output and the reference's at real tokens (``(tokens, hidden)`` each)."""
        ids, mask, types = self.inputs(shape, 1, lengths)[0]
        with torch.no_grad():
            out = forward(ids, mask, types)
        keep = mask.bool()
        return out[keep], self.reference_output(shape, lengths)[keep]

    def error_of(self, forward, shape: ModelShape, lengths: LengthDistribution | None = None) -> float:
        """Max abs error of ``forward``'s output at real tokens against the reference."""
        out, ref = self.compare(forward, shape, lengths)
        return (out.float() - ref).abs().max().item() if out.numel() else 0.0

    # -- cases ----------------------------------------------------------------------
    def _note(self, impl: str, dtype: str, shape: ModelShape) -> str | None:
        spec = impl_spec(impl)
        notes = []
        if spec.compiled:
            notes.append(compile_note(self.compiler))
        if spec.amp:
            notes.append(f"torch.autocast({dtype}) over float32 weights, AdamW state in float32")
        if spec.cuda_graph:
            notes.append(f"one CUDA graph bucket of exactly {shape.label}; outputs cloned out of the graph")
        if spec.fp8:
            notes.append(
                'bertfast.quantize(model, "fp8"): the four GEMMs per layer in e4m3 (row-wise scales, round-to-nearest '
                "weights, activations quantized per token), attention and the rest in bf16; padding-free"
            )
        if spec.train_step:
            how = "captured: one CUDA graph of the bucket, replayed" if self.device.type == "cuda" else "run eagerly"
            notes.append(f"bertfast.TrainStep ({how}; bucket {shape.label}, token budget {shape.batch * shape.seq}; "
                         "its host packing and copy-in timed)")  # fmt: skip
        return "; ".join(n for n in notes if n) or None

    def _work(self, sets: list[tuple], shape: ModelShape, lengths: LengthDistribution | None) -> tuple[float, float]:
        """``(forward FLOPs, real tokens)`` per call, averaged over the input sets.

        Padded rows count the dense ``batch x seq`` shape; padding-free rows the real work.
        """
        config = self.config
        dims = (config.hidden_size, config.num_hidden_layers, config.intermediate_size)
        per_set = [mask.sum(dim=1).tolist() for _, mask, _ in sets]
        tokens = sum(sum(n) for n in per_set) / len(sets)
        if lengths is None:
            return formulas.bert_forward_flops(shape.batch, shape.seq, *dims), tokens
        flops = sum(formulas.bert_varlen_forward_flops(n, *dims) for n in per_set) / len(sets)
        return flops, tokens

    def _row_name(self, kind: str, lengths: LengthDistribution | None) -> str:
        return f"{self.label}-{kind}" + ("" if lengths is None else "-varlen")

    def _graph_pool_bytes(self, built: Built, sets: list[tuple], shape: ModelShape) -> int:
        """Capture the CUDA graph of ``shape`` now; returns the memory its pool holds."""
        ids, mask, types = sets[0]
        with torch.no_grad():
            # Eager warm-up of the same (padded) path first, so only the graph's own pool grows below.
            built.module(ids, mask, types)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        built.runner.capture(shape.batch, shape.seq, mask_dtype=mask.dtype)
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.memory_reserved(self.device) - before)

    def forward_case(
        self, impl: str, dtype: str, shape: ModelShape, input_sets: int = 3, lengths: LengthDistribution | None = None
    ) -> Case:
        """The forward pass of ``impl``; ``lengths``: a padding-free row (``bertfast`` then unpads always)."""
        reason = self.skip_reason(impl)
        if reason is not None:
            raise Skip(reason)
        if impl_spec(impl).fp8:
            dtype = FP8_ROW_DTYPE
        unpad = True if lengths is not None and impl in PADDING_FREE_IMPLS else None
        built = self.build(impl, dtype, unpad=unpad, shape=shape)
        forward = built.forward
        sets = self.inputs(shape, input_sets, lengths)
        resident = _parameter_bytes(built.module)
        if built.runner is not None:
            resident += self._graph_pool_bytes(built, sets, shape)

        def timed(ids, mask, types):
            with torch.no_grad():
                forward(ids, mask, types)

        flops, tokens = self._work(sets, shape, lengths)
        return Case(
            name=self._row_name("fwd", lengths),
            impl=impl,
            dtype=dtype,
            batch=shape.batch,
            seq=shape.seq,
            device=self.device,
            fn=timed,
            input_sets=sets,
            flops=flops,
            shape=shape.label,
            max_error=lambda: self.error_of(forward, shape, lengths),
            resident_bytes=resident,
            note=self._note(impl, dtype, shape),
            tokens=tokens,
            lengths=None if lengths is None else lengths.name,
            check_compiled=_compiled_check(built.module),
        )

    def train_case(
        self, impl: str, dtype: str, shape: ModelShape, input_sets: int = 3, lengths: LengthDistribution | None = None
    ) -> Case:
        """A training step of ``impl``; ``lengths``: a padding-free row (``bertfast`` then unpads always)."""
        spec = impl_spec(impl)
        if spec.fp8:
            raise ValueError(f"{impl} is inference-only")
        reason = self.skip_reason(impl)
        if reason is not None:
            raise Skip(reason)
        if spec.cuda_graph:
            raise ValueError(f"{impl} is inference-only")
        unpad = True if lengths is not None and impl in PADDING_FREE_IMPLS else None
        built = self.build(impl, dtype, fresh=True, unpad=unpad)
        model, forward = built.module, built.forward
        model.train().requires_grad_(True)
        optimizer = _adamw(model)
        generator = torch.Generator().manual_seed(self.seed + 7)
        inputs = self.inputs(shape, input_sets, lengths)
        # The output's dtype: the compute dtype, or (autocast) whatever the last LayerNorm returns; fixed below.
        grad_dtype = DTYPES[dtype]
        sets = []
        for ids, mask, types in inputs:
            grad = torch.randn(ids.shape + (self.config.hidden_size,), generator=generator) * 1e-3
            grad = grad * mask.cpu()[..., None]  # a loss over real tokens: no gradient at padding
            sets.append([ids, mask, types, grad.to(self.device, grad_dtype)])

        def step(ids, mask, types, grad):
            optimizer.zero_grad(set_to_none=True)
            forward(ids, mask, types).backward(grad)
            optimizer.step()

        def match_grad_dtype_and_step():
            out_dtype = forward(*sets[0][:3]).dtype
            if out_dtype != grad_dtype:
                for entry in sets:
                    entry[3] = entry[3].to(out_dtype)
            step(*sets[0])
            optimizer.zero_grad(set_to_none=True)  # the timed steps' peak memory includes the gradients

        def first_step_works():
            _first_steps(f"{impl} training step", match_grad_dtype_and_step)

        flops, tokens = self._work(inputs, shape, lengths)
        return Case(
            name=self._row_name("train", lengths),
            impl=impl,
            dtype=dtype,
            batch=shape.batch,
            seq=shape.seq,
            device=self.device,
            fn=step,
            input_sets=sets,
            flops=formulas.TRAIN_STEP_FACTOR * flops,
            shape=shape.label,
            max_error=first_step_works,
            resident_bytes=lambda: _parameter_bytes(model) + _optimizer_bytes(optimizer),
            note="; ".join(filter(None, [self._note(impl, dtype, shape), train_recipe(impl, dtype)])),
            tokens=tokens,
            lengths=None if lengths is None else lengths.name,
            check_compiled=_compiled_check(model),
        )

    # -- task training steps: masked-LM pre-training, sequence-classification fine-tuning -------
    def _task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The master encoder under a seeded ``task`` head: the weights of every implementation of the task."""
        if task not in self._task_states:
            model_class, _, seed = TASK_MODELS[task]
            torch.manual_seed(self.seed + seed)
            with torch.device(self.device):
                model = model_class(self.config, backend="reference")
            own = model.bert.state_dict()
            encoder = {k: v for k, v in self.master.state_dict().items() if k in own}
            model.bert.load_state_dict(encoder)
            self._task_states[task] = model.state_dict()
        return self._task_states[task]

    def task_model(self, task: str, impl: str, dtype: str) -> torch.nn.Module:
        """A fresh ``task`` model (bertfast or Hugging Face) of ``impl`` with the shared weights."""
        spec = impl_spec(impl)
        if spec.patched or spec.compiled or spec.cuda_graph or spec.fp8:
            raise ValueError(f"{impl} has no task training row")
        model_class, hf_class, _ = TASK_MODELS[task]
        with torch.device(self.device):
            if spec.family == "bertfast":
                model = model_class(self.config, backend=spec.backend)
                model.bert.set_unpad(spec.unpad)
            else:
                import transformers

                model = getattr(transformers, hf_class)(hf_config(self.config, spec.attention))
        model.load_state_dict(self._task_state_dict(task))
        return model.to(DTYPES["fp32" if spec.amp else dtype])

    def task_labels(self, task: str, sets: list[tuple]) -> list[torch.Tensor]:
        """Labels for each input set: masked-LM, the token id on ``MLM_LABELLED_FRACTION`` of the real tokens
        (-100 elsewhere); classification, a class per sequence."""
        generator = torch.Generator().manual_seed(self.seed + 13)
        labels = []
        for ids, mask, _ in sets:
            ids_cpu = ids.cpu()
            if task == "mlm":
                picked = (torch.rand(ids_cpu.shape, generator=generator) < MLM_LABELLED_FRACTION) & mask.cpu().bool()
                batch_labels = torch.where(picked, ids_cpu, torch.full_like(ids_cpu, -100))
            else:
                batch_labels = torch.randint(0, self.config.num_labels, (ids.shape[0],), generator=generator)
            labels.append(batch_labels.to(self.device))
        return labels

    def task_train_case(
        self,
        task: str,
        impl: str,
        dtype: str,
        shape: ModelShape,
        input_sets: int = 3,
        lengths: LengthDistribution | None = None,
    ) -> Case:
        """A training step of the ``task`` model (``"mlm"`` or ``"cls"``) of ``impl``: encoder, head and its
        loss, backward, AdamW; ``bertfast-trainstep`` runs it as :class:`bertfast.TrainStep`.

        bertfast's masked-LM head takes its fused chunked loss on the labelled tokens (no logits); Hugging
        Face computes the ``(batch, seq, vocab)`` logits and ``F.cross_entropy``.  FLOPs count the encoder on
        the padded batch plus the masked-LM head on the labelled tokens (the task's work).
        """
        if lengths is not None:
            raise ValueError("the task training rows run on padded batches")
        if task not in TASK_MODELS:
            raise ValueError(f"unknown training task {task!r}; choose from {sorted(TASK_MODELS)}")
        reason = self.skip_reason(impl)
        if reason is not None:
            raise Skip(reason)
        spec = impl_spec(impl)
        model = self.task_model(task, impl, dtype).train().requires_grad_(True)
        optimizer = _adamw(model, capturable=spec.train_step)
        inputs = self.inputs(shape, input_sets)
        labels = self.task_labels(task, inputs)
        what = f"{impl} {task} training step"
        graph_pool = [0]  # the CUDA graph's memory (bertfast-trainstep on a GPU), counted at its capture
        if spec.train_step:
            names = ("input_ids", "attention_mask", "token_type_ids")
            # TrainStep takes micro-batches on the host: it packs them there and copies them in.
            sets = [
                ({**{name: t.cpu() for name, t in zip(names, batch)}, "labels": batch_labels.cpu()},)
                for batch, batch_labels in zip(inputs, labels)
            ]
            step, first_steps_of = self._train_step(model, optimizer, spec, dtype, shape, graph_pool)

            def first_steps():
                first_steps_of(*sets[0])
        else:
            sets = [(*batch, batch_labels) for batch, batch_labels in zip(inputs, labels)]

            def loss_of(ids, mask, types, batch_labels):
                return model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=batch_labels).loss

            if spec.amp:
                loss_of = _under_autocast(loss_of, self.device, DTYPES[dtype])

            def step(ids, mask, types, batch_labels):
                optimizer.zero_grad(set_to_none=True)
                loss_of(ids, mask, types, batch_labels).backward()
                optimizer.step()

            def first_steps():
                step(*sets[0])
                optimizer.zero_grad(set_to_none=True)  # the timed steps' peak memory includes the gradients

        recipe = train_recipe(impl, dtype, capturable=spec.train_step and self.device.type == "cuda")
        config = self.config
        flops, tokens = self._work(inputs, shape, None)
        if task == "mlm":
            labelled = sum(int((t != -100).sum()) for t in labels) / len(labels)
            flops += formulas.mlm_head_flops(labelled, config.hidden_size, config.vocab_size)
        return Case(
            name=self._row_name(f"{task}-train", None),
            impl=impl,
            dtype=dtype,
            batch=shape.batch,
            seq=shape.seq,
            device=self.device,
            fn=step,
            input_sets=sets,
            flops=formulas.TRAIN_STEP_FACTOR * flops,
            shape=shape.label,
            max_error=lambda: _first_steps(what, first_steps),
            resident_bytes=lambda: _parameter_bytes(model) + _optimizer_bytes(optimizer) + graph_pool[0],
            note="; ".join(filter(None, [self._note(impl, dtype, shape), recipe])),
            tokens=tokens,
        )

    def _train_step(self, model, optimizer, spec: ImplSpec, dtype: str, shape: ModelShape, graph_pool: list):
        """``(step, first_steps)`` of a ``bertfast-trainstep`` row: ``step(micro_batch)`` runs the
        :class:`~bertfast.TrainStep`; ``first_steps(micro_batch)`` runs its eager warm-up steps and (on a GPU)
        the capture before timing, so every timed step replays the graph, and sets ``graph_pool[0]`` to the
        memory the graph's pool holds."""
        from ..train_step import TrainStep

        autocast = DTYPES[dtype] if spec.amp else None
        train_step = TrainStep(model, optimizer, buckets=[(shape.batch, shape.seq)], autocast_dtype=autocast)

        def step(micro_batch):
            train_step(micro_batch)

        def first_steps(micro_batch):
            for _ in range(train_step.warmup_steps if train_step.capture else 1):
                step(micro_batch)
            if train_step.capture:  # the next step captures the graph
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                before = torch.cuda.memory_reserved(self.device)
                step(micro_batch)
                torch.cuda.synchronize(self.device)
                graph_pool[0] = max(0, torch.cuda.memory_reserved(self.device) - before)

        return step, first_steps

    def release(self) -> None:
        """Drop every model copy (the master stays)."""
        self._models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
