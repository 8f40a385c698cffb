"""Sequences packed into rows by their position ids (transformers' padding-free format, as
``DataCollatorWithFlattening`` gives it: no attention_mask, position ids restarting per sequence).

From transformers 5.25, BERT, RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA build their mask from such position
ids and keep the sequences apart; DistilBERT's mask ignores them.  Native bertfast models always keep them
apart, patched ones do what their transformers class does; either way on the variable-length path, without
re-packing.
"""

import copy
import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast import family  # noqa: E402
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error  # noqa: E402

from .helpers import triton_device  # noqa: E402
from .test_family import hf_model  # noqa: E402

BACKENDS = ["reference"] + (["triton"] if triton_device() == "cpu" else [])
LENGTHS = [[3, 1, 5], [6, 3]]  # two rows of 9 tokens: three sequences, then two


def packed_inputs(config, first_position: int, with_types: bool, rows=LENGTHS, seed=0):
    """Ids, token types and restarting position ids of ``rows`` (each a list of sequence lengths)."""
    g = torch.Generator().manual_seed(seed)
    seq = sum(rows[0])
    pad_id = config.pad_token_id or 0
    positions = torch.tensor([[p for n in row for p in range(first_position, first_position + n)] for row in rows])
    inputs = {
        "input_ids": torch.randint(pad_id + 1, config.vocab_size, (len(rows), seq), generator=g),
        "position_ids": positions,
    }
    if with_types:
        inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (len(rows), seq), generator=g)
    return inputs


def each_sequence(model, inputs, rows=LENGTHS):
    """``model``'s last hidden state of every packed sequence run alone, laid out as the packed rows."""
    out = torch.empty(*inputs["input_ids"].shape, model.config.hidden_size)
    for r, row in enumerate(rows):
        start = 0
        for n in row:
            alone = {k: v[r : r + 1, start : start + n] for k, v in inputs.items()}
            out[r, start : start + n] = model(**alone).last_hidden_state[0]
            start += n
    return out


CASES = [("bert", True), ("bert", False), ("roberta", False), ("xlm-roberta", False), ("electra", True)]


def _reference(name: str):
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=70,
            max_position_embeddings=40, type_vocab_size=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.BertModel(config).eval()
    return hf_model(name, "Model")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [LENGTHS, LENGTHS[:1], [[4, 5], [9]]], ids=["batch2", "batch1", "one-row-whole"])
@pytest.mark.parametrize("name, with_types", CASES)
def test_native_model_keeps_packed_sequences_apart(name, with_types, rows, backend):
    reference = _reference(name)
    # DataCollatorWithFlattening restarts positions at 0; a RoBERTa-style model's own start (pad_token_id + 1)
    # is just as much a restart.
    first = reference.config.pad_token_id + 1 if family.positions_count_real_tokens(reference.config) else 0
    native = bertfast.from_hf(reference, backend=backend)
    device = triton_device() if backend == "triton" else "cpu"
    for start in {0, first}:
        inputs = packed_inputs(reference.config, start, with_types, rows)
        with torch.no_grad():
            ours = native(**{k: v.to(device) for k, v in inputs.items()})
            expected = each_sequence(reference, inputs, rows)
        assert rel_error(ours.last_hidden_state.cpu(), expected) <= MODEL_FP32_REL_TOL, start
        assert ours.packed.cu_seqlens.tolist() == [0, *itertools.accumulate(n for row in rows for n in row)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, with_types", [*CASES, ("distilbert", False)])
def test_patched_model_does_what_its_transformers_class_does(name, with_types, backend):
    """Equal to transformers' own answer for the packed rows: sequences apart where the installed class builds its
    mask from position ids, attending across them where it does not (DistilBERT; BERT before 5.25)."""
    reference = _reference(name)
    device = triton_device() if backend == "triton" else "cpu"
    patched = bertfast.patch(copy.deepcopy(reference), backend=backend, strict=True).to(device)
    inputs = packed_inputs(reference.config, 0, with_types)
    with torch.no_grad():
        ours = patched(**{k: v.to(device) for k, v in inputs.items()}).last_hidden_state.cpu()
        theirs = reference(**inputs).last_hidden_state
    assert rel_error(ours, theirs) <= MODEL_FP32_REL_TOL
    apart = rel_error(theirs, each_sequence(reference, inputs)) <= MODEL_FP32_REL_TOL
    assert apart == family.separates_packed_sequences(reference)


def test_position_ids_with_a_mask_or_in_order_are_not_packing():
    """transformers looks for packed sequences only without an attention_mask; position ids that count on along a
    row are one sequence (the dense path, no offsets)."""
    reference = _reference("bert")
    native = bertfast.from_hf(reference, backend="reference")
    inputs = packed_inputs(reference.config, 0, True)
    mask = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        ours = native(**inputs, attention_mask=mask)
        theirs = transformers.BertModel.forward(reference, **inputs, attention_mask=mask)
        assert rel_error(ours.last_hidden_state, theirs.last_hidden_state) <= MODEL_FP32_REL_TOL
        in_order = dict(inputs, position_ids=torch.arange(9)[None].expand(2, 9) + 2)
        assert native(**in_order).packed is None
