"""FLOP counts and the fewest bytes each benchmarked op must move.

A measured time means little on its own; against the device's own peaks it says how far
the op is from its floor:

    floor_ms = max(flops / peak_flops, bytes / peak_bandwidth)

Conventions (the same for every implementation, so rows compare):

- A multiply-add is 2 FLOPs.  Only matmul-class work is counted (GEMMs and the two
  attention products); element-wise work is memory-bound and is reported in GB/s instead.
- Padded batches are counted as dense ``batch x seq``: a padded token costs what a real
  one does unless an implementation skips it, which then shows as a higher rate.
  ``attention_varlen`` and the padding-free model rows (``*-varlen``) are the exception:
  their real work (valid tokens only) is counted.
- Bytes are what the op cannot avoid: each input read once, each output written once.
"""

from __future__ import annotations

from collections.abc import Sequence

# Attention backward: dS = dP-softmax term, dV, dQ, dK, plus recomputing P = 5 matmuls
# against the forward's 2, i.e. 2.5x the forward's FLOPs (flash-attention's convention).
ATTENTION_BACKWARD_FACTOR = 2.5
# A training step: forward + backward (2x forward for the weight and input gradients).
TRAIN_STEP_FACTOR = 3.0


def bert_forward_flops(batch: int, seq: int, hidden: int, layers: int, intermediate: int | None = None) -> float:
    """Encoder FLOPs of one forward pass over ``batch`` sequences of length ``seq``.

    Per token and layer: QKV projection ``6 h^2``, output projection ``2 h^2``, FFN
    ``4 h i``, attention scores and weighted sum ``4 s h``.  With ``i = 4h`` this is the
    usual ``L * s * (24 h^2 + 4 s h)`` per sequence (78.9 GFLOP for BERT-large at s=128).
    The pooler (``2 h^2`` per sequence) and the embeddings are left out.
    """
    intermediate = 4 * hidden if intermediate is None else intermediate
    per_token = 8 * hidden * hidden + 4 * hidden * intermediate + 4 * seq * hidden
    return float(batch) * layers * seq * per_token


def bert_varlen_forward_flops(
    lengths: Sequence[int], hidden: int, layers: int, intermediate: int | None = None
) -> float:
    """Encoder FLOPs of a forward pass over sequences of these ``lengths``, real tokens only.

    What remains once padding is removed: each sequence costs what it would alone at its
    own length (its tokens attend only to each other).  The padding-free rows count this
    work for every implementation, so their TFLOP/s is the rate of useful work.
    """
    return sum(bert_forward_flops(1, int(n), hidden, layers, intermediate) for n in lengths)


def mlm_head_flops(labelled_tokens: float, hidden: int, vocab: int) -> float:
    """Forward FLOPs of the MLM head on the labelled tokens: transform ``2 h^2``, decoder ``2 h V`` each."""
    return float(labelled_tokens) * (2 * hidden * hidden + 2 * hidden * vocab)


def bert_train_flops(batch: int, seq: int, hidden: int, layers: int, intermediate: int | None = None) -> float:
    """A training step (forward + backward) is counted as 3x the forward."""
    return TRAIN_STEP_FACTOR * bert_forward_flops(batch, seq, hidden, layers, intermediate)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, direction: str = "fwd") -> float:
    """``4 * b * h * s^2 * d`` forward (QK^T and PV), 2.5x that backward."""
    forward = 4.0 * batch * heads * seq * seq * head_dim
    return forward if direction == "fwd" else ATTENTION_BACKWARD_FACTOR * forward


def attention_varlen_flops(lengths: Sequence[int], heads: int, head_dim: int, direction: str = "fwd") -> float:
    """Real work of packed attention: each sequence attends only within itself."""
    forward = 4.0 * heads * head_dim * sum(int(n) * int(n) for n in lengths)
    return forward if direction == "fwd" else ATTENTION_BACKWARD_FACTOR * forward


def layer_norm_bytes(tokens: int, hidden: int, elem: int, direction: str = "fwd") -> float:
    """``y = LN(x + linear_bias + residual)``.

    Forward reads ``x`` and ``residual`` and writes ``y`` (3 activations); backward reads
    ``dy`` and the saved sum (or ``x`` and ``residual`` again) and writes ``dx``, which is
    also the residual's gradient (3 activations).  Plus the three ``(hidden,)`` vectors and,
    backward, their gradients and the fp32 per-row statistics.
    """
    activations = 3.0 * tokens * hidden * elem
    vectors = 3.0 * hidden * elem
    if direction == "fwd":
        return activations + vectors
    return activations + 2 * vectors + 2.0 * tokens * 4


def bias_gelu_bytes(tokens: int, features: int, elem: int, direction: str = "fwd") -> float:
    """``y = gelu(x + bias)``: forward reads ``x``, writes ``y``; backward reads ``dy`` and
    ``x`` and writes ``dx`` (plus the bias and its gradient)."""
    if direction == "fwd":
        return 2.0 * tokens * features * elem + features * elem
    return 3.0 * tokens * features * elem + 2.0 * features * elem


def mean_pool_bytes(tokens: int, batch: int, features: int, elem: int, direction: str = "fwd") -> float:
    """``y = normalize(mean over each packed sequence)``: forward reads the ``tokens`` rows and writes
    ``batch`` rows; backward reads ``dy`` (and the fp32 mean) and writes ``dx`` for every token."""
    pooled = batch * features * elem
    if direction == "fwd":
        return tokens * features * elem + pooled
    return tokens * features * elem + pooled + batch * features * 4


def attention_bytes(tokens: int, heads: int, head_dim: int, elem: int, direction: str = "fwd") -> float:
    """Forward reads ``q, k, v`` and writes ``o``; backward reads ``q, k, v, o, do`` and
    writes ``dq, dk, dv`` (plus one fp32 log-sum-exp per query and head).  ``tokens`` is
    ``batch * seq`` for padded attention and the packed total for varlen; the key-padding
    mask (one byte per token) is counted too."""
    activation = float(tokens) * heads * head_dim * elem
    lse = float(tokens) * heads * 4
    if direction == "fwd":
        return 4 * activation + tokens
    return 8 * activation + lse + tokens


def floor_ms(flops: float | None, nbytes: float | None, peaks: dict[str, float]) -> float | None:
    """The time this op cannot beat on a device with these measured ``peaks``."""
    bounds = []
    if flops and peaks.get("bf16_matmul_tflops"):
        bounds.append(flops / (peaks["bf16_matmul_tflops"] * 1e12) * 1e3)
    if nbytes and peaks.get("copy_gbps"):
        bounds.append(nbytes / (peaks["copy_gbps"] * 1e9) * 1e3)
    return max(bounds) if bounds else None
