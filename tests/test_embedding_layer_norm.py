"""embedding_layer_norm: ``LN(word[ids] + position[pos] + token_type[tt])`` on the extension (backend "ext")
against the float64 reference, output and every table's gradient (the reference and the model's use of it are
tested through the models: tests/test_model_parity.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertfast.ops import reference

from .ext_harness import CASE_IDS as EXT_CASE_IDS
from .ext_harness import CASES as EXT_CASES
from .ext_harness import C, check_op, ext, ext_ready, make_inputs  # noqa: F401 (ext_ready: a fixture)


def torch_embedding_layer_norm(word, position, token_type, weight, bias, input_ids, position_ids, token_type_ids, eps):
    summed = F.embedding(input_ids, word) + F.embedding(token_type_ids, token_type)
    summed = summed + F.embedding(position_ids, position)
    return F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps)


@pytest.mark.parametrize(("device", "dtype"), EXT_CASES, ids=EXT_CASE_IDS)
@pytest.mark.parametrize(
    ("batch", "seq", "hidden", "id_dtype"),
    [(1, 1, 1000, torch.int64), (3, 33, 1024, torch.int64), (2, 7, 37, torch.int64), (2, 7, 37, torch.int32)],
    ids=["1x1x1000", "3x33x1024", "2x7x37", "2x7x37-int32-ids"],
)
@pytest.mark.usefixtures("ext_ready")
def test_embedding_layer_norm(device, dtype, batch, seq, hidden, id_dtype):
    gen = torch.Generator().manual_seed(batch * seq + hidden)
    vocab, positions, types = 50, 40, 3
    floats = make_inputs(
        {
            "word": (vocab, hidden),
            "position": (positions, hidden),
            "token_type": (types, hidden),
            "weight": (hidden,),
            "bias": (hidden,),
        },
        gen,
    )
    # Repeated ids so that the table gradients accumulate several rows.
    fixed = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=gen, dtype=id_dtype),
        "position_ids": (torch.arange(seq, dtype=id_dtype) % positions).expand(batch, seq),
        "token_type_ids": torch.randint(0, types, (batch, seq), generator=gen, dtype=id_dtype),
        "eps": 1e-12,
    }

    def run_ext(word, position, token_type, weight, bias, input_ids, position_ids, token_type_ids, eps):
        return ext.embedding_layer_norm(
            input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, eps
        )

    def run_ref(word, position, token_type, weight, bias, input_ids, position_ids, token_type_ids, eps):
        return reference.embedding_layer_norm(
            input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, eps
        )

    out = check_op(run_ext, run_ref, torch_embedding_layer_norm, floats, fixed, device, dtype, gen, "embedding")
    assert out.shape == (batch, seq, hidden)


@pytest.mark.ext_raises
@pytest.mark.usefixtures("ext_ready")
def test_embedding_ids_out_of_range_raise_on_cpu():
    word, position, token_type = torch.randn(10, 8), torch.randn(4, 8), torch.randn(2, 8)
    ids = torch.tensor([[1, 2, 10]])
    with pytest.raises(RuntimeError, match=r"input_ids holds 10 at flat index 2, outside the table's rows \[0, 10\)"):
        C.embedding_layer_norm_forward(
            ids, ids * 0, ids * 0, word, position, token_type, torch.ones(8), torch.zeros(8), 1e-12, 0
        )
