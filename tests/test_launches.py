"""Launches and host syncs of an eager training step (bertfast.launches.LaunchCounter), on the CPU.

The count of a step does not depend on the hidden size, only on the depth, and grows by the
same number per layer, so BERT-large's (24 layers) is ``c(1) + 23 * (c(2) - c(1))`` from
one- and two-layer models of tiny width.  A step is forward, fused MLM loss, backward and a
fused AdamW step on a ragged batch (the padding-free path), counted after a first step (the
optimizer's state exists).  Budgets (BERT-large, fp32):

- Triton backend, no dropout: 837 launches (was 1011; per layer 31, was 38: no zero-filled
  gradients of the LayerNorm and attention statistics, one partial-sum reduction per LayerNorm
  instead of three, no recomputed FFN output GEMM; the QKV weights and biases are concatenated
  per forward, 2 per layer, since the parameters stay independent tensors);
- Triton backend with dropout: 842 (was 1231: one seed draw per forward instead of a draw and a
  host read per kernel call);
- reference backend with dropout: 2211 (2162 before the per-forward QKV concatenation).

Per layer, 20 of the 31 are GEMMs and Triton kernels (11 + 9); the issue's 450 needs fewer ops
per layer than that (fused reductions, fused residual-gradient adds, a fused recompute).
"""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast.launches import LaunchCounter
from bertfast.mlm_loss import IGNORE_INDEX

BERT_LARGE_LAYERS = 24
BUDGETS = {("triton", 0.0): 837, ("triton", 0.1): 842, ("reference", 0.1): 2211}


def _step_counter(backend: str, layers: int, dropout: float) -> LaunchCounter:
    config = bertfast.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = bertfast.BertForMaskedLM(config, backend=backend).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(5, 40, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, IGNORE_INDEX)
    labels[:, 0] = ids[:, 0]
    labels[mask == 0] = IGNORE_INDEX

    def step():
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with LaunchCounter() as counter:
        step()
    return counter


def bert_large_step_launches(backend: str, dropout: float) -> tuple[int, LaunchCounter, LaunchCounter]:
    """BERT-large's launches per eager training step, and the one- and two-layer counters."""
    one, two = (_step_counter(backend, layers, dropout) for layers in (1, 2))
    return one.launches + (BERT_LARGE_LAYERS - 1) * (two.launches - one.launches), one, two


@pytest.mark.parametrize("backend,dropout", list(BUDGETS))
def test_training_step_launches_within_budget(backend, dropout):
    if backend == "triton":
        pytest.importorskip("triton")
        probe = torch.empty(1, 2, 16)
        if not bertfast.ops.can_run("attention_varlen", "triton", (probe, probe, probe), dropout_p=dropout):
            pytest.skip("the triton backend cannot run here")
    launches, one, two = bert_large_step_launches(backend, dropout)
    per_layer = {name: two.by_name[name] - one.by_name[name] for name in two.by_name}
    per_layer = {name: n for name, n in per_layer.items() if n}
    assert launches <= BUDGETS[backend, dropout], f"{launches} launches per BERT-large step; per layer {per_layer}"
    if backend == "triton":  # no kernel zero-fills a gradient no output needs (LayerNorm's and attention's statistics)
        assert per_layer.get("aten.zeros", 0) == 0, per_layer


def test_counter_rules():
    """Views and allocations are free; in-place, out= and reductions count; host reads are syncs."""
    x = torch.randn(4, 6)
    out = torch.empty(4, 6)
    with LaunchCounter() as counter:
        x.view(6, 4).t().unbind(0)
        x.detach()
        torch.empty(3)
        assert counter.launches == 0
        x.add_(1.0)
        torch.mul(x, 2.0, out=out)
        x.sum(0)
        torch.zeros(3)
        assert counter.launches == 4 and counter.syncs == 0
        x[0, 0].item()
        x.tolist()
        (x > 0).nonzero()
    assert counter.syncs == 3, counter.syncs_by_name
    assert counter.by_name["aten._local_scalar_dense"] == 1 and counter.syncs_by_name["tolist"] == 1


def test_counter_counts_triton_launches_on_the_eager_path():
    """The entry points keep their eager fast path (no custom op) and each Triton launch counts once;
    the interpreter's own tensor copies inside a launch do not."""
    pytest.importorskip("triton")
    from bertfast.kernels import bias_gelu

    x, bias = torch.randn(5, 16), torch.randn(16)
    if bias_gelu.unsupported(x, bias) is not None:
        pytest.skip("the triton bias_gelu cannot run here")
    x.requires_grad_()
    with LaunchCounter() as counter:
        y = bias_gelu.bias_gelu(x, bias)
        y.backward(torch.ones_like(y))
    assert counter.triton == 2, counter.by_name
    assert not any(name.startswith("bertfast.") for name in counter.by_name), counter.by_name
