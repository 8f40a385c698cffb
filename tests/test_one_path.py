"""Native and patched models run one layer path (bertfast.layers): same numbers, padding-free, lean on the host."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bench import host_overhead  # noqa: E402

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
    """The benchmark row itself (bench.host_overhead); nothing is timed against a bound here."""
    row = host_overhead.run(rounds=1, shape={"layers": 2})
    assert set(row["ms"]) == {"bertfast", "hf-sdpa-patched", "hf-sdpa"}
    assert all(ms > 0 for ms in row["ms"].values())
    assert all(row["aten_ops"][name] > 0 and row["python_calls"][name] > 0 for name in row["ms"])


def _cat_count(forward) -> int:
    return host_overhead.count_aten_ops(forward)[1].get("aten.cat", 0)


def test_an_in_place_update_after_an_eval_forward_is_seen_by_both_faces():
    native, patched = native_and_patched()
    ids, types, mask = ragged_batch(native.config, [6, 6], 6)
    with torch.no_grad():
        for model in (native, patched):
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            model.encoder.layer[0].attention.self.value.weight.mul_(2)
        after_native = native(ids, mask, types).last_hidden_state
        after_patched = patched(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert torch.equal(after_native, after_patched)


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
