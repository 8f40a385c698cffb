"""bertfast.patch on sentence-transformers models: same embeddings and scores, padding-free encoder."""

import pytest
import torch

import bertfast
from bertfast import layers

from .helpers import minilm_path

# Offline: tests/conftest.py sets HF_HUB_OFFLINE before this import.
st = pytest.importorskip("sentence_transformers")
from sentence_transformers.base.modules import Normalize  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Padding tokens must never change the meaning of a sentence, however long the batch is padded.",
    "BERT encoders turn sentences into vectors.",
    "a",
    "Sentence embeddings, rerankers and retrieval all run the same encoder underneath.",
]


@pytest.fixture(scope="module")
def encoder_module():
    """The checkpoint's Transformer module, shared by every pipeline below (loaded once)."""
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    return model[0]


def pipeline(transformer, mode: str, normalize: bool):
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)]
    if normalize:
        modules.append(Normalize())
    return st.SentenceTransformer(modules=modules, device="cpu")


@pytest.fixture
def packing_spy(monkeypatch):
    """Counts the encoder's padding-free forwards (each packs the batch's mask once)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return pack_mask(*args, **kwargs)

    pack_mask = layers.pack_mask
    monkeypatch.setattr(layers, "pack_mask", spy)
    return calls


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_patched_sentence_transformer_gives_the_same_embeddings(encoder_module, packing_spy, mode, normalize):
    model = pipeline(encoder_module, mode, normalize)
    expected = model.encode(SENTENCES, convert_to_tensor=True, batch_size=4)
    try:
        assert bertfast.patch(model, backend="reference") is model
        assert bertfast.patched_modules(model) == ["0.model"]
        got = model.encode(SENTENCES, convert_to_tensor=True, batch_size=4)
    finally:
        bertfast.unpatch(model)
    assert packing_spy, "the patched encoder must run padding-free on padded batches"
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if normalize:
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)


def test_patching_the_transformer_module_alone_works_too(encoder_module):
    expected = pipeline(encoder_module, "mean", True).encode(SENTENCES, convert_to_tensor=True)
    try:
        bertfast.patch(encoder_module, backend="reference")
        assert bertfast.patched_modules(encoder_module) == ["model"]
        got = pipeline(encoder_module, "mean", True).encode(SENTENCES, convert_to_tensor=True)
    finally:
        bertfast.unpatch(encoder_module)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def cross_encoder():
    """A CrossEncoder built offline from the MiniLM weights, with a new (seeded) one-logit head."""
    torch.manual_seed(0)
    return st.CrossEncoder(minilm_path(), num_labels=1, device="cpu")


def test_patched_cross_encoder_gives_the_same_scores(packing_spy):
    model = cross_encoder()
    pairs = [("what does bertfast do?", sentence) for sentence in SENTENCES]
    expected = model.predict(pairs, convert_to_tensor=True, batch_size=4)
    bertfast.patch(model, backend="reference")
    assert bertfast.patched_modules(model) == ["0.model.bert"]
    got = model.predict(pairs, convert_to_tensor=True, batch_size=4)
    assert packing_spy
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ranked = model.rank("what does bertfast do?", SENTENCES)
    assert sorted(r["corpus_id"] for r in ranked) == list(range(len(SENTENCES)))


def test_patched_distilbert_cross_encoder_ignores_token_types_as_transformers(tmp_path):
    """A BERT tokenizer gives pairs token_type_ids, which transformers' DistilBERT ignores; so must the patch."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.DistilBertConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=48, num_labels=1
    )
    torch.manual_seed(0)
    transformers.DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = st.CrossEncoder(str(tmp_path), num_labels=1, device="cpu")
    pairs = [("what does bertfast do?", sentence) for sentence in SENTENCES]
    assert "token_type_ids" in model.tokenizer(*zip(*pairs[:1]))
    expected = model.predict(pairs, convert_to_tensor=True)
    bertfast.patch(model, backend="reference", strict=True)
    torch.testing.assert_close(model.predict(pairs, convert_to_tensor=True), expected, rtol=0, atol=1e-5)
