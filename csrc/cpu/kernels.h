// CPU implementations of the extension's ops: the same math as csrc/cuda/*.cu, on host
// memory, parallel over rows (or column blocks) with at::parallel_for.
//
// Element types: float, double, c10::Half and c10::BFloat16.  Arithmetic, statistics and
// accumulators use Acc<T>: double for double inputs, float for everything else (half and
// bfloat16 are converted to float element by element).  All pointers address contiguous
// row-major arrays whose shapes the binding has checked.  Every reduction over rows
// (dweight, dbias, ...) runs in a fixed order, independent of the number of threads.

#pragma once

#include <cstdint>
#include <type_traits>

namespace bertfast {
namespace cpu {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- LayerNorm(x + linear_bias + residual); residual and linear_bias may be null ----------
template <typename T>
void layer_norm_forward(const T* x, const T* residual, const T* linear_bias, const T* weight, const T* bias, T* y,
                        Acc<T>* mean, Acc<T>* rstd, int64_t rows, int64_t hidden, double eps);

// dx is the gradient of h = x + linear_bias + residual; dlinear_bias may be null.
template <typename T>
void layer_norm_backward(const T* dy, const T* x, const T* residual, const T* linear_bias, const T* weight,
                         const Acc<T>* mean, const Acc<T>* rstd, T* dx, T* dweight, T* dbias, T* dlinear_bias,
                         int64_t rows, int64_t hidden);

// ---- LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids]) -----
// Ids are int64 and already checked to lie inside their tables.
struct EmbeddingTables {
    const int64_t* input_ids;
    const int64_t* position_ids;
    const int64_t* token_type_ids;
    const void* word;
    const void* position;
    const void* token_type;
};

template <typename T>
void embedding_layer_norm_forward(const EmbeddingTables& tables, const T* weight, const T* bias, T* y, Acc<T>* mean,
                                  Acc<T>* rstd, int64_t rows, int64_t hidden, double eps);

// dsum: gradient of the summed embeddings; the tables' gradients are its scatter-add by id.
template <typename T>
void embedding_layer_norm_backward(const T* dy, const EmbeddingTables& tables, const T* weight, const Acc<T>* mean,
                                   const Acc<T>* rstd, T* dsum, T* dweight, T* dbias, int64_t rows, int64_t hidden);

// ---- gelu_erf(x + bias) ---------------------------------------------------------------------
template <typename T>
void bias_gelu_forward(const T* x, const T* bias, T* y, int64_t rows, int64_t hidden);

template <typename T>
void bias_gelu_backward(const T* dy, const T* x, const T* bias, T* dx, T* dbias, int64_t rows, int64_t hidden);

// ---- softmax(scores * scale) with a (batch, seq_k) key mask (nonzero = keep; may be null) --
// The scores and their gradient are Acc<T> (fp32 for fp16/bf16 probabilities): scores of
// attention can be large (|q . k| ~ 1e4) where fp16's spacing (8 at 1e4) would decide the softmax.
template <typename T>
void masked_softmax_forward(const Acc<T>* scores, const uint8_t* mask, T* probs, int64_t batch,
                            int64_t rows_per_batch, int64_t seq_k, double scale);

// The backward recomputes the probabilities in Acc<T> from the forward's scores and mask.
template <typename T>
void masked_softmax_backward(const T* dprobs, const Acc<T>* scores, const uint8_t* mask, Acc<T>* dscores,
                             int64_t batch, int64_t rows_per_batch, int64_t seq_k, double scale);

}  // namespace cpu
}  // namespace bertfast
