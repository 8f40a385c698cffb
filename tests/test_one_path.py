"""Native and patched models run one layer path (bertfast.layers): same numbers, padding-free, lean on the host."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast.benchmarking import host_overhead  # noqa: E402

from .helpers import ragged_batch, small_config  # noqa: E402


def native_and_patched(**overrides):
    config = small_config(**overrides)
    native = bertfast.BertModel(config, backend="reference").eval()
    hf = transformers.BertModel(transformers.BertConfig(**config.to_dict(), attn_implementation="eager")).eval()
    hf.load_state_dict(native.state_dict())
    bertfast.patch(hf, backend="reference")
    return native, hf


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_native_and_patched_give_the_same_numbers(autocast):
    native, patched = native_and_patched()
    ids, types, mask = ragged_batch(native.config, [9, 4, 7], 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = native(ids, mask, types, output_hidden_states=True)
        theirs = patched(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert ours.last_hidden_state.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))


def _matmul_flops(forward) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "mm" in str(op))  # the GEMMs: mm, addmm, bmm


def test_padding_free_matmul_flops_near_the_real_token_share():
    native, patched = native_and_patched()
    lengths, seq = [16, 5, 3, 4], 16
    ids, types, mask = ragged_batch(native.config, lengths, seq)
    share = sum(lengths) / (len(lengths) * seq)
    padded = _matmul_flops(lambda: native.set_unpad(False)(ids, mask, types))
    native.set_unpad("auto")
    for forward in (lambda: native(ids, mask, types), lambda: patched(input_ids=ids, attention_mask=mask)):
        ratio = _matmul_flops(forward) / padded
        assert ratio <= share * 1.15, f"{ratio:.2f} of the padded FLOPs for a real-token share of {share:.2f}"


def test_host_overhead_row_runs():
    """The benchmark row itself (bertfast.benchmarking.host_overhead); nothing is timed against a bound here."""
    row = host_overhead.run(rounds=1, shape={"layers": 2})
    assert set(row["ms"]) == {"bertfast", "hf-sdpa-patched", "hf-sdpa"}
    assert all(ms > 0 for ms in row["ms"].values())
    assert all(row["aten_ops"][name] > 0 and row["python_calls"][name] > 0 for name in row["ms"])


def _cat_count(forward) -> int:
    return host_overhead.count_aten_ops(forward)[1].get("aten.cat", 0)


def test_no_weight_concatenation_per_layer_in_an_eval_forward():
    native, patched = native_and_patched()
    ids, types, mask = ragged_batch(native.config, [6, 6], 6)
    with torch.no_grad():  # without gradients, the patched model fuses once, then reuses
        patched(input_ids=ids, attention_mask=mask)
    for forward in (lambda: native(ids, mask, types), lambda: patched(input_ids=ids, attention_mask=mask)):
        assert _cat_count(forward) == 0
    # an in-place update of a weight is seen by the next forward
    with torch.no_grad():
        for model in (native, patched):
            model.encoder.layer[0].attention.self.value.weight.mul_(2)
    with torch.no_grad():
        after_native = native(ids, mask, types).last_hidden_state
        after_patched = patched(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert torch.equal(after_native, after_patched)


def test_fused_qkv_storage_survives_to_and_round_trips_the_state_dict(tmp_path):
    native, _ = native_and_patched()
    sa = native.encoder.layer[0].attention.self
    native.to(torch.float64)
    assert sa.key.weight.data_ptr() == sa.query.weight.data_ptr() + sa.query.weight.numel() * 8
    state = {k: v.clone() for k, v in native.state_dict().items()}
    native.save_pretrained(tmp_path)
    again = bertfast.BertModel.from_pretrained(tmp_path, backend="reference", dtype=torch.float64)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    ids, types, mask = ragged_batch(native.config, [5, 2], 5)
    native.train()
    native(ids, mask, types).last_hidden_state.sum().backward()
    assert all(getattr(sa, part).weight.grad is not None for part in ("query", "key", "value"))


@pytest.mark.skipif(bertfast.ops.backend_availability("triton") is not None, reason="needs the Triton backend")
def test_training_step_neither_concatenates_weights_nor_stacks_qkv_gradients():
    config = small_config(num_hidden_layers=1)
    model = bertfast.BertModel(config, backend="triton").train()
    ids, types, mask = ragged_batch(config, [5, 3], 5)
    with host_overhead._CountOps() as forward_ops:
        out = model(ids, mask, types).last_hidden_state
    with host_overhead._CountOps() as backward_ops:
        out.square().sum().backward()
    assert forward_ops.names.get("aten.cat", 0) == 0, forward_ops.names
    assert not {"aten.cat", "aten.stack"} & set(backward_ops.names), backward_ops.names
    assert model.encoder.layer[0].attention.self.value.weight.grad is not None


@pytest.mark.parametrize(
    "backend",
    [
        "reference",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                bertfast.ops.backend_availability("triton") is not None, reason="needs the Triton backend"
            ),
        ),
    ],
)
@pytest.mark.parametrize("face", ["native", "patched"])
def test_dynamic_compile_serves_three_shapes_with_one_graph(face, backend):
    from torch._dynamo.testing import CompileCounter

    native, patched = native_and_patched(num_hidden_layers=1)
    model = native.set_backend(backend) if face == "native" else bertfast.patch(patched, backend=backend)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=counter)
    with torch.no_grad():
        for batch, seq in ((2, 5), (3, 7), (4, 9)):
            ids = torch.randint(1, native.config.vocab_size, (batch, seq))
            out = compiled(input_ids=ids, attention_mask=torch.ones_like(ids))
            assert out.last_hidden_state.shape == (batch, seq, native.config.hidden_size)
    assert counter.frame_count == 1


@pytest.mark.skipif(bertfast.ops.backend_availability("triton") is not None, reason="needs the Triton backend")
def test_triton_layers_take_fp32_parameters_under_autocast():
    """Under autocast the fused kernels read fp32 biases and LayerNorm parameters with fp16 activations."""
    config = small_config(num_hidden_layers=1)
    model = bertfast.BertModel(config, backend="triton").train()
    reference = bertfast.BertModel(config, backend="reference").train()
    reference.load_state_dict(model.state_dict())
    ids, types, mask = ragged_batch(config, [5, 3], 5)
    outs = []
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(ids, mask, types).last_hidden_state
        out.float().square().sum().backward()
        outs.append(out)
    assert outs[0].dtype == torch.float16
    valid = mask.bool()
    torch.testing.assert_close(outs[0][valid].float(), outs[1][valid].float(), rtol=2e-2, atol=2e-2)
    grads = [p.grad for name, p in model.named_parameters() if not name.startswith("pooler.")]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_training_keeps_one_ffn_activation_per_layer():
    """The GELU output is recomputed in the backward from the pre-activation: one (tokens, 4h) tensor kept per layer."""
    config = small_config(num_hidden_layers=2)
    model = bertfast.BertModel(config, backend="reference").train()
    ids, types, mask = ragged_batch(config, [6, 4], 6)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.shape[-1] == config.intermediate_size:
            kept[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, mask, types).last_hidden_state
    assert len(kept) == config.num_hidden_layers, kept
    with torch.no_grad():  # the same numbers as the path without recomputation (no dropout here)
        torch.testing.assert_close(model(ids, mask, types).last_hidden_state, out.detach(), rtol=0, atol=0)
    out.square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("pooler."))


def test_parameters_side_by_side_in_separate_storages_are_not_adjacent():
    """Separate allocations that happen to touch (as the CUDA caching allocator packs them) must be fused
    by copying: a view of the first storage would run into memory it does not own."""
    from bertfast import layers

    block = torch.randn(3 * 8)
    views = [block[8 * i : 8 * (i + 1)].view(4, 2) for i in range(3)]  # one storage, back to back
    assert layers._adjacent(views)
    memory = bytearray(3 * 8 * 4)
    separate = [torch.frombuffer(memory, dtype=torch.float32, offset=32 * i, count=8).view(4, 2) for i in range(3)]
    assert [t.data_ptr() - separate[0].data_ptr() for t in separate] == [0, 32, 64]  # touching in memory
    assert len({t.untyped_storage().data_ptr() for t in separate}) == 3  # ... but three storages
    assert not layers._adjacent(separate)
    # A view over them would make set_ grow the first storage: move it and read uninitialised memory.
    alone = [torch.randn(8).view(4, 2) for _ in range(3)]
    address = alone[0].data_ptr()
    with pytest.raises(RuntimeError, match="not one storage"):
        layers._view_of_adjacent(alone)
    assert alone[0].data_ptr() == address and alone[0].untyped_storage().nbytes() == 8 * 4


def test_kept_fused_weight_is_not_reused_for_new_tensors_at_a_freed_address():
    """Without gradients the fused QKV weight is kept between forwards.  New parameter tensors at the
    address and version of earlier ones (an allocator hands freed addresses back, as repeated
    ``functional_call`` over fresh tensors meets) are new weights, not a hit."""
    import copy

    from torch.func import functional_call

    native, _ = native_and_patched(num_hidden_layers=1)
    ids, types, mask = ragged_batch(native.config, [5, 3], 5)
    names = [f"encoder.layer.0.attention.self.{part}.weight" for part in ("query", "key", "value")]
    memory = bytearray(sum(native.get_parameter(n).numel() for n in names) * 4)

    def weights_at_one_address(scale):
        weights, offset = {}, 0
        for name in names:
            p = native.get_parameter(name)
            weights[name] = torch.frombuffer(memory, dtype=torch.float32, offset=offset, count=p.numel()).view(p.shape)
            weights[name].copy_(p.detach() * scale)
            offset += p.numel() * 4
        return weights

    with torch.no_grad():
        for scale in (1.0, 0.5):
            out = functional_call(native, weights_at_one_address(scale), (ids, mask, types)).last_hidden_state
            expected = copy.deepcopy(native)
            for name in names:
                expected.get_parameter(name).mul_(scale)
            torch.testing.assert_close(out, expected(ids, mask, types).last_hidden_state, rtol=0, atol=0)


def test_patched_training_step_concatenates_no_weights(tmp_path):
    """patch lays each layer's Wq, Wk, Wv back to back in one storage: no aten.cat per forward in training,
    and the model still saves and reloads in transformers."""
    _, patched = native_and_patched(num_hidden_layers=2)
    ids, types, mask = ragged_batch(patched.config, [5, 3], 5)
    patched.train()
    with host_overhead._CountOps() as forward_ops:
        out = patched(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert forward_ops.names.get("aten.cat", 0) == 0, forward_ops.names
    out.square().sum().backward()
    assert all(p.grad is not None for n, p in patched.named_parameters() if "attention.self" in n)
    patched.save_pretrained(tmp_path)  # parameters sharing one storage are still saved one by one
    again = transformers.BertModel.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in patched.state_dict().items())
