"""Parameters stay ordinary, independent tensors: every way users touch them is seen by the next forward.

Each test changes the parameters the way a PyTorch tool does (``.data``, ``copy_``,
``load_state_dict``, ``.to()``, ``deepcopy``, pickling, an EMA, ``accelerate`` and
``safetensors`` saves, ``torch.func``), then compares the model with a transformers model
built from its state at that moment: bertfast must give that model's answer, in eval
(where a kept copy of a weight would go stale) and in training.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error  # noqa: E402

from .helpers import hf_twin, ragged_batch, small_config  # noqa: E402

QKV = ("query", "key", "value")


def _native():
    return bertfast.BertModel(small_config(), backend="reference").eval()


def _patched():
    config = small_config()
    hf = transformers.BertModel(transformers.BertConfig(**config.to_dict(), attn_implementation="eager")).eval()
    return bertfast.patch(hf, backend="reference")


FACES = {"native": _native, "patched": _patched}


def _batch(model):
    return ragged_batch(model.config, [7, 3, 5], 7, generator=torch.Generator().manual_seed(0))


def _forward(model, ids, mask, types):
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state


def _loss(hidden, mask):
    """A loss with a gradient everywhere (the mean square of a LayerNorm output is constant)."""
    probe = torch.linspace(-1.0, 1.0, hidden.shape[-1], dtype=hidden.dtype)
    return (hidden[mask.bool()] * probe).sum()


def assert_answers_like_transformers(model):
    """``model``'s output equals a fresh transformers model's holding ``model``'s state right now."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    config = transformers.BertConfig(**small_config().to_dict(), attn_implementation="eager")
    hf = transformers.BertModel(config).eval()
    hf.load_state_dict(state)
    ids, types, mask = _batch(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        ours = _forward(model, ids.to(device), mask.to(device), types.to(device)).float().cpu()
        theirs = _forward(hf, ids, mask, types)
    valid = mask.bool()
    assert rel_error(ours[valid], theirs[valid]) <= MODEL_FP32_REL_TOL


def _qkv(model, layer=0):
    attention = model.encoder.layer[layer].attention.self
    return [getattr(attention, name) for name in QKV]


def _warm(model):
    """An eval forward first: a design that kept a fused weight from it would now hold a stale one."""
    ids, types, mask = _batch(model)
    with torch.no_grad():
        _forward(model, ids, mask, types)


@pytest.mark.parametrize("face", FACES)
def test_every_parameter_has_a_storage_of_its_own(face):
    model = FACES[face]()
    _warm(model)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(storages) == len(set(storages))
    assert all(p.is_leaf and type(p) is torch.nn.Parameter for p in model.parameters())


def test_patch_and_unpatch_leave_the_parameters_where_they_were():
    hf = transformers.BertModel(transformers.BertConfig(**small_config().to_dict(), attn_implementation="eager"))
    before = {name: (p, p.data_ptr(), p.untyped_storage().data_ptr()) for name, p in hf.named_parameters()}
    for step in (bertfast.patch, bertfast.unpatch):
        step(hf)
        after = {name: (p, p.data_ptr(), p.untyped_storage().data_ptr()) for name, p in hf.named_parameters()}
        assert after == before, step.__name__


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("how", ["data", "copy_", "mul_", "load_state_dict"])
@pytest.mark.parametrize("moved", [False, True], ids=["", "after-to"])
def test_in_place_edits_after_an_eval_forward_are_seen(face, how, moved):
    model = FACES[face]()
    if moved:  # new storage for every parameter
        model.to(torch.float64).to(torch.float32)
    _warm(model)
    for linear in _qkv(model, 0) + _qkv(model, 1):
        new = torch.randn_like(linear.weight)
        if how == "data":
            linear.weight.data[:] = new  # does not bump the version counter
            linear.bias.data.add_(0.25)
        elif how == "copy_":
            with torch.no_grad():
                linear.weight.copy_(new)
                linear.bias.copy_(torch.randn_like(linear.bias))
        elif how == "mul_":
            with torch.no_grad():
                linear.weight.mul_(-1.5)
    if how == "load_state_dict":
        state = {k: torch.randn_like(v) if ".attention.self." in k else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    assert_answers_like_transformers(model)


@pytest.mark.parametrize("face", FACES)
def test_ema_update_of_a_deepcopy_is_seen(face):
    model = FACES[face]()
    ema = copy.deepcopy(model)
    _warm(ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for averaged, p in zip(ema.parameters(), model.parameters()):
        averaged.data.mul_(0.5).add_(p.data, alpha=0.5)  # through .data: no version counter moves
    assert_answers_like_transformers(ema)
    assert_answers_like_transformers(model)


@pytest.mark.parametrize("face", FACES)
def test_moved_with_to_then_updated_is_seen(face):
    """``patch`` then ``.to()`` is the common order (``.cuda()`` on a GPU); every later update counts."""
    model = FACES[face]()
    _warm(model)
    model.to(torch.float64)
    _warm(model)
    for linear in _qkv(model):
        linear.weight.data.add_(0.5)
    assert_answers_like_transformers(model)
    model.to(torch.float32)
    assert_answers_like_transformers(model)


@pytest.mark.parametrize("face", FACES)
def test_pickled_model_answers_like_the_original(face):
    model = FACES[face]()
    _warm(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for p in again.parameters():
            p.mul_(0.9)
    assert_answers_like_transformers(again)


@pytest.mark.parametrize("face", FACES)
def test_inference_mode_then_training_with_frozen_qkv_weights(face):
    """BitFit after an ``inference_mode`` forward: nothing made under inference mode may reach training."""
    model = FACES[face]()
    ids, types, mask = _batch(model)
    with torch.inference_mode():
        _forward(model, ids, mask, types)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(_forward(model, ids, mask, types), mask).backward()
    assert all(linear.bias.grad is not None and linear.weight.grad is None for linear in _qkv(model))
    optimizer.step()
    model.eval()
    assert_answers_like_transformers(model)


@pytest.mark.parametrize("face", FACES)
def test_safetensors_save_model_and_load_model_round_trip(face, tmp_path):
    from safetensors.torch import load_model, save_model

    model = FACES[face]()
    _warm(model)
    save_model(model, str(tmp_path / "model.safetensors"))
    other = FACES[face]()
    load_model(other, str(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert_answers_like_transformers(other)


@pytest.mark.parametrize("face", FACES)
def test_accelerate_saves_every_key_and_loads_its_state(face, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    model = FACES[face]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    _warm(model)
    accelerator.save_model(model, tmp_path / "model")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    accelerator.save_state(tmp_path / "state")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    accelerator.load_state(tmp_path / "state")
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert_answers_like_transformers(model)


@pytest.mark.parametrize("face", FACES)
def test_functional_call_and_grad_read_the_given_weights(face):
    from torch.func import functional_call, grad

    model = FACES[face]()
    _warm(model)
    ids, types, mask = _batch(model)
    params = {k: v.detach() * 0.5 for k, v in model.named_parameters()}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.5)
        out = functional_call(model, params, (), dict(input_ids=ids, attention_mask=mask, token_type_ids=types))
        torch.testing.assert_close(out.last_hidden_state, _forward(reference, ids, mask, types), rtol=0, atol=0)

    def loss(weights):
        kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return _loss(functional_call(model, weights, (), kwargs).last_hidden_state, mask)

    grads = grad(loss)(params)
    _loss(_forward(reference, ids, mask, types), mask).backward()
    for name, p in reference.named_parameters():
        expected = torch.zeros_like(p) if p.grad is None else p.grad  # the pooler is not in the loss
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_native_and_hugging_face_train_the_same_qkv_weights():
    """Three independent parameters, three gradients: one SGD step moves Wq, Wk, Wv as transformers does."""
    model = bertfast.BertModel(small_config(), backend="reference").train()
    hf = hf_twin(model).train()
    ids, types, mask = _batch(model)
    for m in (model, hf):
        _loss(_forward(m, ids, mask, types), mask).backward()
    for name, p in model.named_parameters():
        if ".attention.self." not in name:
            continue
        theirs = hf.get_parameter(name).grad
        if name.endswith("key.bias"):  # softmax ignores a shift of every score by q.bk: the true gradient is 0
            scale = hf.get_parameter(name.replace("key.bias", "query.bias")).grad.norm()
            assert p.grad.norm() <= 1e-4 * scale and theirs.norm() <= 1e-4 * scale, name
        else:
            assert rel_error(p.grad, theirs) <= 1e-5, name
