"""Tracers and function transforms: a trace or export made from one batch gives transformers' answers for batches
padded otherwise, a function transform gives transformers' values and gradients, and what cannot be traced is
refused naming the tracer.  The padding-free layout and the ids' range checks are decided from values, so under
torch.jit.trace and torch.func bertfast takes the padded path (torch.export runs as torch.compile does)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error  # noqa: E402

from .helpers import hf_twin, small_config  # noqa: E402

EXAMPLE = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]  # right padding
OTHERS = [
    [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],  # other lengths
    [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]],  # left padding (the pooler reads position 0)
    [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],  # none
]


class Encoder(torch.nn.Module):
    """The model's last hidden state and pooled output, as a tracer wants them (a tuple)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


def inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(rows)
    return torch.randint(1, 101, mask.shape, generator=g), torch.randint(0, 2, mask.shape, generator=g), mask


def faces():
    torch.manual_seed(0)
    native = bertfast.BertModel(small_config(), backend="reference").eval()
    hf = hf_twin(native)
    return {"native": native, "patched": bertfast.patch(copy.deepcopy(hf), backend="reference", strict=True)}, hf


def assert_transformers_answers(outputs, hf, batch):
    ids, types, mask = batch
    theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    tokens = mask.bool()
    assert rel_error(outputs[0][tokens], theirs.last_hidden_state[tokens]) <= MODEL_FP32_REL_TOL
    assert rel_error(outputs[1], theirs.pooler_output) <= MODEL_FP32_REL_TOL


@pytest.mark.parametrize("face", ["native", "patched"])
@pytest.mark.parametrize("tracer", ["jit", "export"])
def test_a_trace_serves_batches_padded_otherwise(tracer, face):
    models, hf = faces()
    encoder = Encoder(models[face])
    with torch.no_grad():
        if tracer == "jit":
            traced = torch.jit.trace(encoder, inputs(EXAMPLE), check_trace=False)
        else:
            traced = torch.export.export(encoder, inputs(EXAMPLE)).module()
        for rows in OTHERS:
            batch = inputs(rows, seed=1)
            assert_transformers_answers(traced(*batch), hf, batch)


@pytest.mark.parametrize("face", ["native", "patched"])
def test_function_transforms_give_transformers_values_and_gradients(face):
    models, hf = faces()
    encoder = Encoder(models[face])
    batch = inputs(OTHERS[1])
    mask = batch[2][..., None]

    def loss(outputs):
        return (outputs[0] * mask).square().sum() + outputs[1].square().sum()

    params = {name: p.detach() for name, p in encoder.named_parameters()}
    with torch.no_grad():
        assert_transformers_answers(torch.func.functional_call(encoder, params, batch), hf, batch)
    grads = torch.func.grad(lambda p: loss(torch.func.functional_call(encoder, p, batch)))(params)
    loss(Encoder(hf)(*batch)).backward()
    for name, p in hf.named_parameters():
        if name.endswith("key.bias"):  # softmax is shift invariant: its true gradient is 0, both are rounding noise
            continue
        assert rel_error(grads["model." + name], p.grad) <= 1e-4, name


@pytest.mark.parametrize("face", ["native", "patched"])
def test_what_cannot_be_traced_is_refused_naming_the_tracer(face):
    models, hf = faces()
    with pytest.raises(NotImplementedError, match="torch.fx symbolic tracing"):
        torch.fx.symbolic_trace(Encoder(models[face]))
    if not bertfast.family.separates_packed_sequences(models[face]):
        return  # the installed transformers' BertModel lets such sequences attend to each other: nothing to refuse
    ids = torch.randint(1, 101, (1, 7))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])

    class Packed(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids):
            return self.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state

    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record sequences packed"):
        torch.jit.trace(Packed(models[face]), (ids, positions), check_trace=False)
