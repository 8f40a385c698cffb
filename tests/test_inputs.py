"""Bad input gets an error that names the problem; backends are chosen explicitly or explained."""

import pytest
import torch

import bertfast
from bertfast import ops

from .helpers import small_config


@pytest.fixture(scope="module")
def model():
    return bertfast.BertModel(small_config(), backend="reference").eval()


def ids(config, batch=2, seq=5):
    return torch.randint(0, config.vocab_size, (batch, seq))


def test_sequence_longer_than_positions(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids(model.config, seq=model.config.max_position_embeddings + 1))


def test_token_ids_out_of_range(model):
    bad = ids(model.config)
    bad[1, 2] = model.config.vocab_size
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 101\)"):
        model(bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="input_ids"):
        model(bad)


def test_token_types_out_of_range(model):
    x = ids(model.config)
    with pytest.raises(ValueError, match="token_type_ids"):
        model(x, token_type_ids=torch.full_like(x, model.config.type_vocab_size))


def test_mask_shape_must_match_ids(model):
    x = ids(model.config)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(x, attention_mask=torch.ones(2, 6))


def test_non_integer_ids(model):
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(2, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.tensor([1, 2, 3]))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        bertfast.BertModel(small_config(), backend="cudnn")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.bias_gelu(x, torch.randn(8), backend="fast")


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bertfast.BertModel.from_pretrained(tmp_path / "missing")


def test_explicit_backend_never_falls_back_silently():
    # The Triton kernels run on CUDA tensors or in the interpreter on CPU tensors: never on "meta".
    x = torch.randn(4, 8, device="meta")
    with pytest.raises(bertfast.BackendUnavailable, match="backend 'triton' cannot run bias_gelu"):
        ops.bias_gelu(x, torch.randn(8, device="meta"), backend="triton")
    reasons = ops.explain("bias_gelu", x, torch.randn(8, device="meta"))
    assert reasons["reference"] is None and reasons["triton"]


def test_dropout_runs_only_where_supported():
    """A backend without the dropout capability is never handed a dropout_p: explain says why, a call raises."""
    q = torch.randn(1, 4, 2, 8)
    x, w = torch.randn(3, 8), torch.ones(8)
    reasons = ops.explain("attention", q, q, q, dropout_p=0.1)
    assert reasons["reference"] is None
    if not ops.can_run("attention", "ext", (q, q, q)):
        pytest.skip("the ext backend (no dropout) is not available here")
    assert "attention-probability dropout" in reasons["ext"]
    assert ops.explain("attention", q, q, q)["ext"] is None
    with pytest.raises(bertfast.BackendUnavailable, match="dropout"):
        ops.attention(q, q, q, dropout_p=0.1, backend="ext")
    assert "hidden dropout" in ops.explain("layer_norm", x, w, w, dropout_p=0.1)["ext"]
    with pytest.raises(bertfast.BackendUnavailable, match="dropout"):
        ops.layer_norm(x, w, w, dropout_p=0.1, backend="ext")


def test_auto_on_cpu_is_the_reference():
    x = torch.randn(2, 8)
    assert ops.auto_backend_name("bias_gelu", x, torch.randn(8)) == "reference"


def test_set_backend_switches_every_submodel():
    model = bertfast.BertForMaskedLM(small_config(), backend="reference")
    model.set_backend("auto")
    assert model.backend == "auto" and model.bert.backend == "auto"
    with pytest.raises(ValueError):
        model.set_backend("nope")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ops.layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8)), ValueError, "weight must have"),
        (
            lambda: ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), residual=torch.randn(2, 7)),
            ValueError,
            "residual",
        ),
        (lambda: ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), eps=0.0), ValueError, "eps"),
        (lambda: ops.bias_gelu(torch.randint(0, 3, (2, 8)), torch.randn(8)), TypeError, "floating"),
        (lambda: ops.bias_gelu(torch.randn(2, 8), torch.randn(8, dtype=torch.float64)), TypeError, "dtype"),
        (
            lambda: ops.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            ValueError,
            "batch, seq, heads, head_dim",
        ),
        (
            lambda: ops.attention(*(torch.randn(2, 4, 2, 8),) * 3, attention_mask=torch.ones(2, 5)),
            ValueError,
            "attention_mask must have shape",
        ),
        (lambda: ops.attention(*(torch.randn(2, 4, 2, 8).transpose(-1, -2),) * 3), ValueError, "head_dim"),
        (lambda: ops.attention(*(torch.randn(1, 4, 2, 8),) * 3, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: ops.attention_varlen(*(torch.randn(5, 2, 8),) * 3, torch.tensor([0, 5]), 5), TypeError, "int32"),
    ],
)
def test_op_arguments_are_checked(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_packed_fields_are_attributes_only():
    """keys(), len() and positions count the same fields (the packed ones are attributes)."""
    model = bertfast.BertModel(small_config(), backend="reference").eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    out = model(ids, mask)
    assert out.packed is not None, "the padded batch should take the padding-free path"
    assert out.keys() == ["last_hidden_state", "pooler_output"] and len(out) == len(out.keys())
    assert out[1] is out["pooler_output"] is out.pooler_output


def test_nan_at_a_masked_key_reaches_valid_queries_as_documented():
    """The README's padding rule: probability 0 at masked keys, but 0 x NaN is NaN (as in Hugging Face)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[True, True, True, False]])
    assert ops.attention(q, k, v, mask, backend="reference").isfinite().all()
    v[0, 3] = float("nan")  # a padded position's value row
    out = ops.attention(q, k, v, mask, backend="reference")
    assert out.isnan().all()


@pytest.mark.parametrize("where", ["inputs", "model"])
def test_a_device_mismatch_is_named_in_the_users_terms(where):
    model = bertfast.BertModel(small_config(), backend="reference").eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    if where == "inputs":
        ids, mask = ids.to("meta"), mask.to("meta")
    else:
        model = model.to("meta")
    with pytest.raises(ValueError, match="the model is on .* but its inputs are on"):
        model(ids, mask)
