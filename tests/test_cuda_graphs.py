"""CUDA-graph inference (bertfast.cuda_graphs): bucketing, padding and cropping on the CPU; capture on a GPU."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast.cuda_graphs import (  # noqa: E402
    CUDAGraphRunner,
    check_inputs,
    choose_bucket,
    crop_outputs,
    pad_inputs,
    padded_forward,
)
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error  # noqa: E402
from bertfast.patching import _UNPAD_ATTR, patch  # noqa: E402

from .helpers import ragged_batch, small_config  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def make_hf(kind: str, **overrides):
    config = small_config(num_labels=2 if kind == "BertForQuestionAnswering" else 3, **overrides)
    return getattr(transformers, kind)(transformers.BertConfig(**config.to_dict())).eval()


# --------------------------------------------------------------------------------------
# Bucketing, padding and cropping (the logic a replay relies on), on the CPU
# --------------------------------------------------------------------------------------


def test_choose_bucket_takes_the_smallest_bucket_that_fits():
    batches, seqs = (1, 2, 4, 8), (16, 32, 64)
    assert choose_bucket(1, 1, batches, seqs) == (1, 16)
    assert choose_bucket(3, 17, batches, seqs) == (4, 32)
    assert choose_bucket(8, 64, batches, seqs) == (8, 64)
    assert choose_bucket(2, 16, (8, 2, 2), (64, 16)) == (2, 16)  # unsorted, repeated buckets are fine
    with pytest.raises(ValueError, match="larger than the largest batch bucket"):
        choose_bucket(9, 5, batches, seqs)
    with pytest.raises(ValueError, match="longer than the largest sequence bucket"):
        choose_bucket(1, 65, batches, seqs)
    with pytest.raises(ValueError, match="non-empty input"):
        choose_bucket(0, 5, batches, seqs)
    for bad in ((), (0, 4), (2.0,), (True,)):
        with pytest.raises(ValueError, match="positive integers"):
            choose_bucket(1, 1, bad, seqs)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32, None])
def test_pad_inputs_masks_out_the_padding(mask_dtype):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (3, 5), generator=g)
    types = torch.randint(0, 2, (3, 5), generator=g)
    mask = None if mask_dtype is None else (torch.rand(3, 5, generator=g) > 0.3).to(mask_dtype)
    padded_ids, padded_mask, padded_types = pad_inputs(ids, mask, types, (4, 8), pad_token_id=7)
    assert padded_ids.shape == padded_mask.shape == padded_types.shape == (4, 8)
    assert torch.equal(padded_ids[:3, :5], ids) and torch.equal(padded_types[:3, :5], types)
    expected_mask = torch.ones(3, 5, dtype=padded_mask.dtype) if mask is None else mask
    assert torch.equal(padded_mask[:3, :5], expected_mask)
    outside = torch.ones(4, 8, dtype=torch.bool)
    outside[:3, :5] = False
    assert (padded_ids[outside] == 7).all()
    assert (padded_mask[outside] == 0).all() and (padded_types[outside] == 0).all()
    # in place, into static buffers holding stale values from an earlier call
    out = (torch.full((4, 8), 99), torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long))
    result = pad_inputs(ids, mask, types, (4, 8), pad_token_id=7, out=out)
    assert all(r is o for r, o in zip(result, out))
    assert torch.equal(out[0], padded_ids) and torch.equal(out[2], padded_types)
    assert torch.equal(out[1].bool(), padded_mask.bool())
    with pytest.raises(ValueError, match="does not fit"):
        pad_inputs(ids, mask, types, (2, 8))


def test_crop_outputs_crops_per_token_fields_only():
    from transformers.modeling_outputs import (
        BaseModelOutputWithPoolingAndCrossAttentions,
        QuestionAnsweringModelOutput,
        SequenceClassifierOutput,
    )

    batch_bucket, seq_bucket, hidden = 4, 8, 6
    hidden_states = torch.randn(batch_bucket, seq_bucket, hidden)
    base = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=hidden_states,
        pooler_output=torch.randn(batch_bucket, hidden),
        hidden_states=(hidden_states, hidden_states + 1),
    )
    cropped = crop_outputs(base, 3, 5)
    assert type(cropped) is type(base)
    assert torch.equal(cropped.last_hidden_state, hidden_states[:3, :5])
    assert torch.equal(cropped.pooler_output, base.pooler_output[:3])
    assert [h.shape for h in cropped.hidden_states] == [(3, 5, hidden)] * 2
    assert cropped.last_hidden_state.data_ptr() != hidden_states.data_ptr()  # cloned out of static memory
    assert crop_outputs(base, 3, 5, clone=False).last_hidden_state.data_ptr() == hidden_states.data_ptr()
    # per-token rank-2 fields are cropped along the sequence; per-sequence ones never, even when
    # the number of labels happens to equal the sequence bucket
    qa = QuestionAnsweringModelOutput(start_logits=torch.randn(4, 8), end_logits=torch.randn(4, 8))
    assert crop_outputs(qa, 3, 5).start_logits.shape == crop_outputs(qa, 3, 5).end_logits.shape == (3, 5)
    sequence = SequenceClassifierOutput(logits=torch.randn(4, seq_bucket))
    assert crop_outputs(sequence, 3, 5).logits.shape == (3, seq_bucket)
    native = bertfast.outputs.SequenceClassifierOutput(logits=torch.randn(4, 3))
    assert crop_outputs(native, 2, 5).logits.shape == (2, 3)
    assert crop_outputs((hidden_states,), 1, 2)[0].shape == (1, 2, hidden)


@pytest.mark.parametrize("kind", ["BertForQuestionAnswering", "BertForSequenceClassification", "native"])
def test_padded_then_cropped_forward_equals_the_forward(kind):
    """What a replay computes (the model on bucket-padded inputs, cropped), eagerly on the CPU."""
    if kind == "native":
        model = bertfast.BertForTokenClassification(small_config(num_labels=3), backend="reference").eval()
    else:
        model = patch(make_hf(kind), backend="reference")
    ids, types, mask = ragged_batch(model.config, [9, 4, 6], 9)
    with torch.no_grad():
        direct = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        padded = pad_inputs(ids, mask, types, choose_bucket(3, 9, (1, 2, 4), (8, 16)), pad_token_id=0)
        replayed = crop_outputs(model(input_ids=padded[0], attention_mask=padded[1], token_type_ids=padded[2]), 3, 9)
    assert type(replayed) is type(direct)
    for key in direct.keys():
        a, b = replayed[key], direct[key]
        assert a.shape == b.shape, key
        if a.dim() >= 2 and a.shape[:2] == mask.shape:
            a, b = a[mask.bool()], b[mask.bool()]
        assert rel_error(a, b) <= MODEL_FP32_REL_TOL, key


def test_runner_refuses_cpu_models_and_tensors_and_unpatched_models():
    with pytest.raises(RuntimeError, match="CUDA graphs need a model on a CUDA device"):
        CUDAGraphRunner(bertfast.BertModel(small_config()).eval())
    with pytest.raises(RuntimeError, match="CUDA graphs need a model on a CUDA device"):
        CUDAGraphRunner(patch(make_hf("BertModel")))
    with pytest.raises(TypeError, match="call bertfast.patch"):
        CUDAGraphRunner(make_hf("BertModel"))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        CUDAGraphRunner(lambda ids: ids)
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA tensors; input_ids is on cpu"):
        check_inputs(ids, None, None, torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, seq\)"):
        check_inputs(torch.ones(3, dtype=torch.long), None, None, torch.device("cuda", 0))


def test_graphs_switch_native_and_patched_models_to_the_padded_path_and_back():
    """A graph (and its warm-up) runs the padded path, whatever the model's padding-free mode."""
    native = bertfast.BertForQuestionAnswering(small_config(num_labels=2))
    patched = patch(make_hf("BertForQuestionAnswering"), unpad=True)
    for model, attr, before in ((native, "unpad", "auto"), (patched, _UNPAD_ATTR, True)):
        assert getattr(model.bert, attr) == before
        with padded_forward(model):
            assert getattr(model.bert, attr) is False
        assert getattr(model.bert, attr) == before


# --------------------------------------------------------------------------------------
# Capture and replay (GPU only)
# --------------------------------------------------------------------------------------


def eager_on_bucket(model, ids, mask, types, bucket):
    """The eager forward on the bucket-padded inputs, cropped: what a replay must reproduce exactly."""
    with torch.no_grad():
        padded = pad_inputs(ids, mask, types, bucket)
        out = model(input_ids=padded[0], attention_mask=padded[1], token_type_ids=padded[2])
    return crop_outputs(out, *ids.shape)


@needs_cuda
@pytest.mark.parametrize("kind", ["native", "patched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replay_matches_the_eager_forward(kind, dtype):
    if kind == "native":
        # graphs run the padded path; the eager comparison below must too
        model = bertfast.BertForQuestionAnswering(small_config(num_labels=2)).set_unpad(False)
    else:
        model = patch(make_hf("BertForQuestionAnswering"), unpad=False)
    model = model.to("cuda", dtype).eval()
    runner = CUDAGraphRunner(model, batch_buckets=(2, 4), seq_buckets=(16, 32))
    for lengths, seq in (([9, 4, 6], 9), ([16, 2], 16), ([20, 31, 5], 31), ([3, 3, 1], 3)):
        ids, types, mask = (t.cuda() for t in ragged_batch(model.config, lengths, seq))
        out = runner(ids, mask, types)
        bucket = choose_bucket(len(lengths), seq, runner.batch_buckets, runner.seq_buckets)
        expected = eager_on_bucket(model, ids, mask, types, bucket)
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        valid = mask.bool()
        for key in ("start_logits", "end_logits"):
            assert out[key].shape == (len(lengths), seq)
            # the same kernels on the same data: identical at valid positions
            assert torch.equal(out[key][valid], expected[key][valid]), key
            if dtype == torch.float32:  # unpadded: only the GEMMs' summation order may differ
                assert rel_error(out[key][valid], eager[key][valid]) <= MODEL_FP32_REL_TOL, key
    assert runner.captured_buckets == [(2, 16), (4, 16), (4, 32)]


@needs_cuda
def test_runner_recaptures_after_parameters_move_and_refuses_training():
    model = patch(make_hf("BertModel")).cuda().eval()
    runner = CUDAGraphRunner(model, batch_buckets=(2,), seq_buckets=(16,))
    ids, types, mask = (t.cuda() for t in ragged_batch(model.config, [7, 3], 7))
    valid = mask.bool()
    first = runner(ids, mask, types).last_hidden_state
    assert first.dtype == torch.float32
    model.half()  # new parameter storage: the captured graph would read stale memory
    second = runner(ids, mask, types).last_hidden_state
    assert second.dtype == torch.float16
    assert torch.equal(second[valid], eager_on_bucket(model, ids, mask, types, (2, 16)).last_hidden_state[valid])
    with torch.no_grad():
        model.embeddings.LayerNorm.bias.add_(1.0)  # in-place updates are seen by the graph
    third = runner(ids, mask, types).last_hidden_state
    assert torch.equal(third[valid], eager_on_bucket(model, ids, mask, types, (2, 16)).last_hidden_state[valid])
    assert not torch.equal(third, second)
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA tensors"):
        runner(ids.cpu(), mask.cpu(), types.cpu())
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        runner(ids, mask, types)


def test_parameter_watch_sees_moves_and_replacements_without_walking_per_call():
    from bertfast.cuda_graphs import ParameterWatch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    watch = ParameterWatch(model)
    assert not watch.changed()
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the graphs read it where it is
    assert not watch.changed()
    model.to(torch.float64)  # new storage for every parameter
    assert watch.changed()
    watch.snapshot()
    model[1].weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))  # a new Parameter object
    assert watch.changed()
    watch.snapshot()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert watch.changed()
    watch.snapshot()
    assert not watch.changed()
