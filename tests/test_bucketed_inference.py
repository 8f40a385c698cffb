"""The default inference path on CUDA: padding-free batches in token-budget buckets, one graph each.

The bucketed function is exactly what a graph captures; ``cuda_graphs.bucketed_eager()`` runs it
eagerly on any device, so here it is checked against the eager path for every output of every
head, and for host synchronisations (a captured forward must have none)."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bertfast
from bertfast import buckets, cuda_graphs, layers
from bertfast.padding import pack_mask
from bertfast.varlen import check_cu_seqlens

from .helpers import hf_twin, small_config

HEADS = [
    bertfast.BertModel,
    bertfast.BertForMaskedLM,
    bertfast.BertForPreTraining,
    bertfast.BertForSequenceClassification,
    bertfast.BertForTokenClassification,
    bertfast.BertForQuestionAnswering,
]
MAX_POSITIONS = 40


def batch_of(case: str, vocab: int, generator):
    """``(input_ids, attention_mask or None, token_type_ids)`` and whether the bucketed path serves it."""
    seq, rows = {
        "right": (13, [13, 5, 1, 9]),
        "no-padding": (11, [11, 11, 11]),
        "no-mask": (11, None),
        "one-token": (4, [1]),  # one real token in the batch (seq 1 breaks the eager QA head: squeeze(-1))
        "bucket-limit": (MAX_POSITIONS, [MAX_POSITIONS, 7]),  # a row as long as the bucket's max_seqlen
        "left": (9, [9, 4, 6]),
    }[case]
    batch = 3 if rows is None else len(rows)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    types = torch.randint(0, 2, (batch, seq), generator=generator)
    if rows is None:
        return ids, None, types
    positions = torch.arange(seq)[None, :]
    lengths = torch.tensor(rows)[:, None]
    mask = (positions >= seq - lengths) if case == "left" else (positions < lengths)
    return ids, mask.long(), types


def tensors_of(out):
    """Every tensor an output holds, by field name (recursing into tuples)."""
    found = {}
    for field in dataclasses.fields(out):
        value = getattr(out, field.name)
        if isinstance(value, torch.Tensor):
            found[field.name] = value
        elif dataclasses.is_dataclass(value):  # packed bookkeeping
            found.update({f"{field.name}.{k}": v for k, v in vars(value).items() if isinstance(v, torch.Tensor)})
    return found


@pytest.fixture
def bucketed_calls(monkeypatch):
    calls = []
    real = layers.bucket_encoder

    def spy(bert, static, *args):
        calls.append(static.bucket)
        return real(bert, static, *args)

    monkeypatch.setattr(layers, "bucket_encoder", spy)
    return calls


@pytest.mark.parametrize("case", ["right", "no-padding", "no-mask", "one-token", "bucket-limit", "left"])
@pytest.mark.parametrize("head", HEADS, ids=lambda cls: cls.__name__)
def test_bucketed_path_equals_eager_for_every_output(head, case, bucketed_calls):
    torch.manual_seed(0)
    model = head(small_config(max_position_embeddings=MAX_POSITIONS), backend="reference").eval()
    ids, mask, types = batch_of(case, model.config.vocab_size, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=types)
        assert not bucketed_calls, "graphs are for CUDA: the CPU runs eagerly by default"
        with cuda_graphs.bucketed_eager():
            got = model(ids, attention_mask=mask, token_type_ids=types)
            again = model(ids, attention_mask=mask, token_type_ids=types)  # the bucket's static batch, refilled
    # Left padding runs padded when a pooler reads position 0 (as eagerly); everything else is bucketed.
    pools = getattr(model, "bert", model).pooler is not None
    assert len(bucketed_calls) == (0 if case == "left" and pools else 2)
    want, have, have_again = tensors_of(expected), tensors_of(got), tensors_of(again)
    assert want.keys() == have.keys() == have_again.keys()
    for name in want:
        assert have[name].shape == want[name].shape, name
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(have[name], have_again[name]), name


def test_patched_transformers_model_takes_the_bucketed_path(bucketed_calls):
    torch.manual_seed(0)
    native = bertfast.BertModel(small_config(), backend="reference").eval()
    hf = hf_twin(native, "sdpa")
    ids, mask, types = batch_of("right", native.config.vocab_size, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types)
        bertfast.patch(hf, backend="reference")
        with cuda_graphs.bucketed_eager():
            got = hf(ids, attention_mask=mask, token_type_ids=types)
    assert bucketed_calls
    keep = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[keep], expected.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_graphs_switch_and_autograd_keep_the_eager_path(bucketed_calls):
    model = bertfast.BertModel(small_config(), backend="reference").eval()
    ids, mask, types = batch_of("right", model.config.vocab_size, torch.Generator().manual_seed(5))
    with cuda_graphs.bucketed_eager():
        out = model(ids, attention_mask=mask)  # autograd on: eager, so gradients flow
        assert out.last_hidden_state.requires_grad and not bucketed_calls
        bertfast.set_graphs(False)
        try:
            with torch.no_grad():
                model(ids, attention_mask=mask)
        finally:
            bertfast.set_graphs(True)
        assert not bucketed_calls
        with torch.no_grad():
            model(ids, attention_mask=mask, output_hidden_states=True)  # per-layer states: eager
        assert not bucketed_calls
    with pytest.raises(TypeError, match="True or False"):
        bertfast.set_graphs("off")


def test_the_eager_twin_row_turns_the_graphs_off_for_its_call_only(bucketed_calls):
    """``bertfast-eager`` (the benchmark's twin of the default row) runs with the graphs off inside its
    call, and leaves the switch as it found it."""
    from bertfast.benchmarking.models import impl_spec

    model = bertfast.BertModel(small_config(), backend="reference").eval()
    ids, mask, _ = batch_of("right", model.config.vocab_size, torch.Generator().manual_seed(6))
    with cuda_graphs.bucketed_eager(), torch.no_grad():
        for impl, served in (("bertfast-eager", False), ("bertfast", True)):
            with cuda_graphs.graphs_enabled(impl_spec(impl).graphs):
                model(ids, attention_mask=mask)
            assert bool(bucketed_calls) == served, impl
        assert cuda_graphs.serves(model, ids.device)  # the switch is back on


class HostSyncs(TorchDispatchMode):
    """Ops that read device values back to the host (on a GPU each is a synchronisation)."""

    READS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __enter__(self):
        # Tensor.tolist of a CPU tensor reads its memory without dispatching an op: watched here.
        self._tolist = torch.Tensor.tolist

        def recorded(t):
            self.found.append("tolist")
            return self._tolist(t)

        torch.Tensor.tolist = recorded
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        to_host = name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu"
        if name in self.READS or (to_host and any(getattr(a, "device", None) not in (None, out.device) for a in args)):
            self.found.append(name)
        return out


@pytest.mark.parametrize("head", [bertfast.BertModel, bertfast.BertForQuestionAnswering])
def test_the_bucketed_forward_reads_nothing_back(head):
    model = head(small_config(), backend="reference").eval()
    ids, mask, types = batch_of("right", model.config.vocab_size, torch.Generator().manual_seed(7))
    bert = getattr(model, "bert", model)
    packed = pack_mask(mask.bool())
    static = buckets.StaticPackedBatch(buckets.choose_bucket(packed.total, *mask.shape), ids.device)
    static.fill(packed, ids, types, torch.arange(mask.shape[1]).expand_as(ids))
    ops = layers._encoder_plan(bert, "reference", torch.float32, layers.layer_parts_function(bert))
    with torch.no_grad(), HostSyncs() as syncs:
        layers.bucket_encoder(bert, static, ops, torch.float32, layers.layer_parts_function(bert))
    assert syncs.found == []


def test_buckets_hold_their_batches_and_offsets_keep_the_contract():
    for total, batch, seq in [(1, 1, 1), (14, 2, 8), (64, 4, 16), (65, 5, 13), (3000, 32, 128), (512, 1, 512)]:
        bucket = buckets.choose_bucket(total, batch, seq, max_positions=512)
        assert total <= bucket.tokens <= max(64, 1.25 * total) and seq <= bucket.max_seqlen <= max(16, 2 * seq)
        assert bucket.sequences & (bucket.sequences - 1) == 0
    assert buckets.choose_bucket(buckets.MAX_BUCKET_TOKENS + 1, 1000, 512) is None
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :8], mask[1, :1], mask[2, :5] = True, True, True
    packed = pack_mask(mask)
    bucket = buckets.choose_bucket(packed.total, 3, 8)
    static = buckets.StaticPackedBatch(bucket, torch.device("cpu"), pad_token_id=0)
    ids = torch.randint(1, 50, (3, 8))
    static.fill(packed, ids, torch.ones_like(ids), torch.arange(8).expand(3, 8))
    check_cu_seqlens(static.cu_seqlens, bucket.tokens, bucket.max_seqlen)
    assert static.cu_seqlens[:4].tolist() == [0, 8, 9, 14]
    assert torch.equal(static.input_ids[:14], ids[mask]) and static.input_ids[14:].eq(0).all()
    assert static.position_ids[14:].eq(0).all() and static.token_type_ids[14:].eq(0).all()


def test_patched_sentence_transformers_encode_and_predict_are_bucketed(bucketed_calls):
    st = pytest.importorskip("sentence_transformers")
    from .helpers import minilm_path

    sentences = ["Hi", "The quick brown fox jumps over the lazy dog.", "a", "Buckets hold padding-free batches."]
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    expected = model.encode(sentences, convert_to_tensor=True, batch_size=3)
    torch.manual_seed(0)
    cross = st.CrossEncoder(minilm_path(), num_labels=1, device="cpu")
    pairs = [("what do buckets hold?", s) for s in sentences]
    expected_scores = cross.predict(pairs, convert_to_tensor=True, batch_size=3)
    bertfast.patch(model, backend="reference")
    bertfast.patch(cross, backend="reference")
    with cuda_graphs.bucketed_eager():
        got = model.encode(sentences, convert_to_tensor=True, batch_size=3)
        assert len(bucketed_calls) == 2  # two batches
        scores = cross.predict(pairs, convert_to_tensor=True, batch_size=3)
        assert len(bucketed_calls) == 4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


def test_inference_mode_then_no_grad_reuse_the_bucket(bucketed_calls):
    """A bucket first filled under inference_mode is refilled in place under no_grad (pipelines use both)."""
    model = bertfast.BertForSequenceClassification(small_config(), backend="reference").eval()
    ids, mask, types = batch_of("right", model.config.vocab_size, torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    with cuda_graphs.bucketed_eager():
        with torch.inference_mode():
            first = model(ids, attention_mask=mask).logits
        with torch.no_grad():
            second = model(ids, attention_mask=mask).logits
    assert len(bucketed_calls) == 2
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_captured_buckets_match_the_eager_path_on_cuda(dtype, bucketed_calls):
    """On a GPU the default eval forward captures one graph per bucket and replays it."""
    from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error

    torch.manual_seed(0)
    model = bertfast.BertForQuestionAnswering(small_config(num_labels=2)).to("cuda", dtype).eval()
    generator = torch.Generator().manual_seed(11)
    for case in ("right", "no-padding", "one-token", "right", "left"):
        ids, mask, types = (None if t is None else t.cuda() for t in batch_of(case, model.config.vocab_size, generator))
        with torch.no_grad():
            got = model(ids, attention_mask=mask, token_type_ids=types)
            bertfast.set_graphs(False)
            try:
                expected = model(ids, attention_mask=mask, token_type_ids=types)
            finally:
                bertfast.set_graphs(True)
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        for name in ("start_logits", "end_logits"):
            assert got[name].shape == expected[name].shape
            if dtype == torch.float32:
                assert rel_error(got[name][keep], expected[name][keep]) <= MODEL_FP32_REL_TOL, name
            else:
                torch.testing.assert_close(got[name][keep], expected[name][keep], rtol=2e-2, atol=2e-2)
    graphs = cuda_graphs._MODEL_GRAPHS[model.bert]
    assert len(graphs.entries) == len(set(bucketed_calls)) >= 2  # the second "right" batch replayed its bucket


def test_a_hooked_encoder_runs_eagerly_so_its_hooks_run(bucketed_calls):
    model = bertfast.BertModel(small_config(), backend="reference").eval()
    seen = []
    ids, mask, types = batch_of("right", model.config.vocab_size, torch.Generator().manual_seed(5))
    with cuda_graphs.bucketed_eager(), torch.no_grad():
        model(ids, attention_mask=mask)
        assert len(bucketed_calls) == 1
        handle = model.encoder.layer[0].register_forward_hook(lambda module, args, out: seen.append(1))
        model(ids, attention_mask=mask)  # a hook added after the bucket was made
        handle.remove()
        model(ids, attention_mask=mask)
    assert seen == [1] and len(bucketed_calls) == 2
