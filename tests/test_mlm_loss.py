"""The fused, chunked MLM head + cross-entropy against the unfused head on whole logits.

The yardstick is the head written out in float64 PyTorch (dense, GELU, LayerNorm, tied
decoder, ``F.cross_entropy(ignore_index=-100)`` over all logits); fp32 results follow the
policy's relative tolerances and fp16 / autocast-bf16 the 2x / 3x rule against PyTorch's
own unfused head at the same precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bertfast
from bertfast import numerics
from bertfast.mlm_loss import IGNORE_INDEX, masked_lm_head_loss, masked_lm_loss

from .helpers import assert_key_bias_gradient_vanishes, is_key_bias, small_config

LN_EPS = 1e-12
PARAM_NAMES = ("dense_weight", "dense_bias", "ln_weight", "ln_bias", "decoder_weight", "decoder_bias")


def _head_params(hidden: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """Random float64 head weights at trained-model scales (LayerNorm gain near 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) * hidden**-0.5,
        torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.1,
        1.0 + 0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64),
        0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64),
        torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.5,
        torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1,
    ]


def _labels(shape, vocab: int, masked_fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) >= masked_fraction] = IGNORE_INDEX
    return labels


def _unfused(hidden, params, labels):
    """The head on every position, whole logits, then PyTorch's cross-entropy."""
    dense_w, dense_b, ln_w, ln_b, dec_w, dec_b = params
    t = F.layer_norm(F.gelu(F.linear(hidden, dense_w, dense_b)), (hidden.shape[-1],), ln_w, ln_b, LN_EPS)
    logits = F.linear(t, dec_w, dec_b)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _fused(hidden, params, labels, **kwargs):
    dense_w, dense_b, ln_w, ln_b, dec_w, dec_b = params
    return masked_lm_loss(hidden, dense_w, dense_b, ln_w, ln_b, LN_EPS, dec_w, dec_b, labels, **kwargs)


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _loss_and_grads(fn, hidden, params, labels, **kwargs):
    inputs = [hidden, *params]
    loss = fn(hidden, params, labels, **kwargs)
    grads = torch.autograd.grad(loss, inputs)
    return loss, grads


def _reference64(hidden, params, labels):
    return _loss_and_grads(_unfused, *_leaves([hidden], torch.float64), _leaves(params, torch.float64), labels)


@pytest.mark.parametrize(
    "hidden_size, vocab, shape, masked_fraction, chunk_size",
    [
        (48, 101, (3, 9), 0.5, 4),  # chunk smaller than the masked count, not a divisor
        (48, 101, (3, 9), 0.5, 1),  # one row per chunk
        (40, 257, (2, 33), 0.15, 1000),  # chunk larger than the masked count (one chunk)
        (64, 1009, (5, 13), 0.3, 7),  # prime vocabulary
        (48, 30, (1, 1), 1.0, 2),  # a single labelled token
    ],
)
def test_matches_unfused_fp32(hidden_size, vocab, shape, masked_fraction, chunk_size):
    hidden = torch.randn(*shape, hidden_size, dtype=torch.float64)
    params = _head_params(hidden_size, vocab, seed=vocab)
    labels = _labels(shape, vocab, masked_fraction, seed=hidden_size)
    assert (labels != IGNORE_INDEX).any()
    ref_loss, ref_grads = _reference64(hidden, params, labels)

    loss, grads = _loss_and_grads(
        _fused,
        *_leaves([hidden], torch.float32),
        _leaves(params, torch.float32),
        labels,
        chunk_size=chunk_size,
        backend="reference",
    )
    assert loss.dtype == torch.float32
    numerics.assert_close(loss, ref_loss, name="loss")
    for name, grad, ref in zip(("hidden", *PARAM_NAMES), grads, ref_grads):
        numerics.assert_close(grad, ref, direction="backward", name=f"d{name}")


def test_chunk_equal_to_masked_count_and_sum_reduction():
    hidden = torch.randn(4, 10, 48, dtype=torch.float64)
    params = _head_params(48, 101, seed=3)
    labels = _labels((4, 10), 101, 0.25, seed=4)
    count = int((labels != IGNORE_INDEX).sum())
    ref_loss, ref_grads = _reference64(hidden, params, labels)
    h, p = _leaves([hidden], torch.float32), _leaves(params, torch.float32)
    total, grads = _loss_and_grads(_fused, *h, p, labels, chunk_size=count, reduction="sum")
    numerics.assert_close(total, ref_loss * count, name="summed loss")
    for name, grad, ref in zip(("hidden", *PARAM_NAMES), grads, ref_grads):
        numerics.assert_close(grad, ref * count, direction="backward", name=f"d{name}")


def test_gradcheck_float64():
    hidden = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = _leaves(_head_params(6, 11, seed=5), torch.float64)
    labels = _labels((2, 3), 11, 0.6, seed=6)
    assert int((labels != IGNORE_INDEX).sum()) > 2  # more than one chunk

    def fn(h, *p):
        return _fused(h, p, labels, chunk_size=2, backend="reference")

    assert torch.autograd.gradcheck(fn, (hidden, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_all_ignored_gives_zero_with_zero_gradients():
    """Unlike PyTorch's mean cross-entropy (NaN, as Hugging Face returns), 0 with a graph."""
    hidden = torch.randn(2, 6, 48, requires_grad=True)
    params = _leaves(_head_params(48, 101, seed=7), torch.float32)
    labels = torch.full((2, 6), IGNORE_INDEX)
    assert torch.isnan(_unfused(hidden, params, labels))  # what F.cross_entropy does
    loss = _fused(hidden, params, labels, chunk_size=4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for name, t in zip(("hidden", *PARAM_NAMES), (hidden, *params)):
        assert t.grad is not None, f"d{name} is missing"
        assert torch.count_nonzero(t.grad) == 0, f"d{name} is not zero"


def _lowp_check(dtype, autocast: bool):
    hidden = torch.randn(3, 11, 64, dtype=torch.float64)
    params = _head_params(64, 257, seed=8)
    labels = _labels((3, 11), 257, 0.4, seed=9)
    ref_loss, ref_grads = _reference64(hidden, params, labels)
    leaf_dtype = torch.float32 if autocast else dtype

    def run(fn, **kwargs):
        h, p = _leaves([hidden], leaf_dtype), _leaves(params, leaf_dtype)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return _loss_and_grads(fn, *h, p, labels, **kwargs)

    torch_loss, torch_grads = run(_unfused)
    loss, grads = run(_fused, chunk_size=5, backend="reference")
    for g, ref in zip(grads, [hidden, *params]):
        assert g.dtype == leaf_dtype and g.shape == ref.shape
    # The bounds are in the compute dtype's terms; compare the fp32 leaves' gradients as such.
    as_lowp = (lambda t: t.to(dtype)) if autocast else (lambda t: t)
    numerics.assert_close(loss.to(dtype), ref_loss, torch_lowp=torch_loss.to(dtype), name="loss")
    for name, grad, ref, theirs in zip(("hidden", *PARAM_NAMES), grads, ref_grads, torch_grads):
        numerics.assert_close(
            as_lowp(grad), ref, direction="backward", torch_lowp=as_lowp(theirs), name=f"d{name} ({dtype})"
        )


def test_fp16_by_the_lowp_rule():
    _lowp_check(torch.float16, autocast=False)


def test_autocast_bf16_by_the_lowp_rule():
    _lowp_check(torch.bfloat16, autocast=True)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_logits_never_exist_whole():
    """No op output, forward or backward, is larger than one chunk of logits or a weight."""
    hidden_size, vocab, chunk = 16, 503, 8
    hidden = torch.randn(4, 32, hidden_size, requires_grad=True)
    params = _leaves(_head_params(hidden_size, vocab, seed=10), torch.float32)
    labels = _labels((4, 32), vocab, 0.5, seed=11)
    masked = int((labels != IGNORE_INDEX).sum())
    assert masked > 4 * max(chunk, hidden_size)  # whole logits would be 4x the bound at least
    bound = max(chunk, hidden_size) * vocab  # a chunk of logits, or dWd (V x H)
    with _LargestTensor() as probe:
        _fused(hidden, params, labels, chunk_size=chunk).backward()
    assert probe.largest <= bound, f"an op produced {probe.largest} elements (> {bound})"
    with _LargestTensor() as probe:
        _unfused(hidden, params, labels).backward()
    assert probe.largest >= masked * vocab  # the probe sees the unfused head's logits


def test_triton_backend_matches_reference():
    pytest.importorskip("triton")
    if not bertfast.ops.can_run("layer_norm", "triton", (torch.empty(1, 16),) * 3):
        pytest.skip("the triton backend cannot run here")
    hidden = torch.randn(2, 7, 16, dtype=torch.float64)
    params = _head_params(16, 37, seed=12)
    labels = _labels((2, 7), 37, 0.5, seed=13)
    ref_loss, ref_grads = _reference64(hidden, params, labels)
    h, p = _leaves([hidden], torch.float32), _leaves(params, torch.float32)
    loss, grads = _loss_and_grads(_fused, *h, p, labels, chunk_size=3, backend="triton")
    numerics.assert_close(loss, ref_loss, name="loss (triton)")
    for name, grad, ref in zip(("hidden", *PARAM_NAMES), grads, ref_grads):
        numerics.assert_close(grad, ref, direction="backward", name=f"d{name} (triton)")


def test_head_module_matches_the_model_loss():
    """With BertForMaskedLM's own head: same loss and the same gradient on every parameter (tied ones too)."""
    model = bertfast.BertForMaskedLM(small_config(), backend="reference").double()
    ids = torch.randint(1, model.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = _labels((3, 17), model.config.vocab_size, 0.3, seed=14)
    labels[mask == 0] = IGNORE_INDEX

    ref_loss = model(ids, attention_mask=mask, labels=labels).loss
    params = list(model.parameters())
    ref_grads = torch.autograd.grad(ref_loss, params)

    hidden = model.bert(ids, attention_mask=mask).last_hidden_state
    loss = masked_lm_head_loss(model.cls.predictions, hidden, labels, chunk_size=5, backend="reference")
    grads = torch.autograd.grad(loss, params)
    # The model's loss is taken in fp32 (as Hugging Face's); ours stays in fp64 here.
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    names = [n for n, _ in model.named_parameters()]
    assert "bert.embeddings.word_embeddings.weight" in names  # the tied decoder weight
    ref_by_name = dict(zip(names, ref_grads))
    for name, grad, ref in zip(names, grads, ref_grads):
        if is_key_bias(name):
            query_bias_grad = ref_by_name[name.replace("key.bias", "query.bias")]
            assert_key_bias_gradient_vanishes(name, grad, query_bias_grad)
            assert_key_bias_gradient_vanishes(name, ref, query_bias_grad)
            continue
        assert (grad - ref).norm() <= 1e-6 * ref.norm(), name


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels_value=101), ValueError, r"labels must be in \[0, 101\)"),
        (dict(labels_value=-5), ValueError, r"labels must be in \[0, 101\)"),
        (dict(labels_shape=(2, 5)), ValueError, "labels must have shape"),
        (dict(labels_float=True), TypeError, "labels must be an integer"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
        (dict(reduction="none"), ValueError, "reduction must be"),
        (dict(decoder_width=47), ValueError, "decoder_weight must have shape"),
        (dict(backend="nope"), ValueError, "unknown backend"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    hidden = torch.randn(2, 6, 48)
    params = _leaves(_head_params(48, 101, seed=15), torch.float32)
    labels = _labels((2, 6), 101, 0.5, seed=16)
    labels[0, 0] = 7
    if "labels_value" in change:
        labels[0, 0] = change["labels_value"]
    if "labels_shape" in change:
        labels = labels[:, :5]
    if "labels_float" in change:
        labels = labels.float()
    if "decoder_width" in change:
        params[4] = params[4][:, : change["decoder_width"]]
    kwargs = {k: change[k] for k in ("chunk_size", "reduction", "backend") if k in change}
    with pytest.raises(error, match=match):
        _fused(hidden, params, labels, **kwargs)


def _masked_lm_batch(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 13), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    labels = _labels((3, 13), vocab, 0.4, seed=seed + 1)
    labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


@pytest.mark.parametrize("kind", ["BertForMaskedLM", "BertForPreTraining"])
@pytest.mark.parametrize("unpad", [False, True])
def test_training_with_labels_uses_the_fused_loss(kind, unpad):
    """model.train() with labels: no logits, and loss and every gradient as the logits path gives them."""
    config = small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = getattr(bertfast, kind)(config, backend="reference").double().train()
    model.bert.set_unpad(unpad)
    ids, mask, labels = _masked_lm_batch(config.vocab_size, seed=21)
    extra = {"next_sentence_label": torch.tensor([0, 1, 1])} if kind == "BertForPreTraining" else {}
    logits_name = "logits" if kind == "BertForMaskedLM" else "prediction_logits"
    params = list(model.parameters())

    fused = model(ids, attention_mask=mask, labels=labels, **extra)
    assert getattr(fused, logits_name) is None  # the (tokens x vocab) logits were never formed
    assert (model.bert(ids, attention_mask=mask).packed is not None) == unpad
    fused_grads = torch.autograd.grad(fused.loss, params)

    full = model(ids, attention_mask=mask, labels=labels, return_logits=True, **extra)
    assert getattr(full, logits_name).shape == (3, 13, config.vocab_size)
    full_grads = torch.autograd.grad(full.loss, params)

    assert abs(fused.loss.item() - full.loss.item()) <= 1e-6 * full.loss.item()
    for (name, _), grad, ref in zip(model.named_parameters(), fused_grads, full_grads):
        assert (grad - ref).norm() <= 1e-6 * ref.norm() + 1e-15, name

    model.eval()  # eval keeps the logits, as Hugging Face does, and the loss is the same
    evaluated = model(ids, attention_mask=mask, labels=labels, **extra)
    assert getattr(evaluated, logits_name) is not None
    assert abs(evaluated.loss.item() - full.loss.item()) <= 1e-6 * full.loss.item()
    assert getattr(model(ids, attention_mask=mask, labels=labels, return_logits=False, **extra), logits_name) is None


def test_model_loss_is_zero_without_labelled_tokens():
    """Both loss paths give 0 (not Hugging Face's NaN) when every label is -100, with finite gradients."""
    model = bertfast.BertForMaskedLM(small_config(), backend="reference")
    ids, mask, labels = _masked_lm_batch(model.config.vocab_size, seed=23)
    labels.fill_(IGNORE_INDEX)
    for training in (True, False):
        model.train(training)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        assert loss.item() == 0.0
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["BertForMaskedLM", "BertForPreTraining"])
def test_padding_free_logits_are_computed_on_real_tokens_only(kind, monkeypatch):
    """unpad=True: the vocabulary head sees only the real tokens; logits equal the padded path's there, 0 elsewhere."""
    config = small_config()
    model = getattr(bertfast, kind)(config, backend="reference").double().eval()
    ids, mask, _ = _masked_lm_batch(config.vocab_size, seed=25)
    name = "logits" if kind == "BertForMaskedLM" else "prediction_logits"
    model.bert.set_unpad(False)
    padded = getattr(model(ids, attention_mask=mask), name)

    rows_seen = []
    decoder = model.cls.predictions.decoder
    hook = decoder.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[0]))
    model.bert.set_unpad(True)
    unpadded = getattr(model(ids, attention_mask=mask), name)
    hook.remove()
    assert rows_seen == [int(mask.sum())]  # packed (tokens, hidden) rows, not (batch, seq, hidden)
    valid = mask.bool()
    assert (unpadded[valid] - padded[valid]).abs().max() <= 1e-10 * padded[valid].abs().max()
    assert (unpadded[~valid] == 0).all()


def test_training_step_compiles_whole_with_return_logits():
    """The fused loss reads the labelled count back to the host; return_logits=True gives one graph instead."""
    torch._dynamo.reset()
    model = bertfast.BertForMaskedLM(small_config(), backend="reference").train()
    ids, mask, labels = _masked_lm_batch(model.config.vocab_size, seed=27)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss = compiled(ids, attention_mask=mask, labels=labels, return_logits=True).loss
    loss.backward()
    torch.manual_seed(3)
    eager = model(ids, attention_mask=mask, labels=labels, return_logits=True).loss
    assert abs(loss.item() - eager.item()) <= 1e-5 * eager.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float32, ["aten.addmm", "aten.sub_", "aten.exp_", "aten.index_put_"]),
        # 16-bit: the subtraction writes the fp32 buffer (no separate upcast); one cast back for the GEMMs
        (torch.bfloat16, ["aten.addmm", "aten.sub", "aten.exp_", "aten.index_put_", "aten._to_copy"]),
    ],
    ids=["fp32", "bf16"],
)
def test_backward_touches_each_logits_chunk_in_few_passes(dtype, expected):
    """Per chunk the (rows x V) buffer is written by the GEMM, then exp(z - lse) in two passes and the
    one-hot subtraction; the loss's gradient scales the smaller products instead of the buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden_size, vocab, chunk = 16, 503, 8
    hidden = torch.randn(1, chunk, hidden_size).to(dtype).requires_grad_()
    params = _leaves(_head_params(hidden_size, vocab, seed=10), dtype)
    labels = torch.randint(0, vocab, (1, chunk), generator=torch.Generator().manual_seed(12))
    loss = _fused(hidden, params, labels, chunk_size=chunk) * 3.0  # a gradient other than 1 reaches the loss

    class ChunkOps(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                isinstance(out, torch.Tensor)
                and out.numel() == chunk * vocab
                and func.overloadpacket != torch.ops.aten.t
            ):
                self.names.append(str(func.overloadpacket))
            return out

    with ChunkOps() as ops:
        loss.backward()
    assert ops.names == expected, ops.names
