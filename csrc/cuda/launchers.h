// Plain C++ API of the CUDA kernels in csrc/cuda/*.cu.
//
// The .cu files include only CUDA's own headers and the binding (csrc/bindings.cpp) includes
// only torch's CPU headers, so this header is the whole contract between them: raw device
// pointers, sizes, a dtype tag, and the CUDA stream as an opaque pointer (the value of
// torch.cuda.current_stream().cuda_stream).  Every launcher:
//
//   - expects contiguous row-major tensors whose sizes the binding has already checked;
//   - runs on the calling thread's current CUDA device (the binding selects it with
//     use_device: the extension links its own copy of the CUDA runtime, so it does not rely
//     on the device torch's runtime made current);
//   - only enqueues work on `stream` (no synchronisation, no allocation: the binding passes
//     any scratch space, sized by the matching *_workspace_floats function);
//   - returns a cudaError_t value as an int, 0 on success (message: cuda_error_string).
//
// Statistics and accumulators are fp32 for every dtype.

#pragma once

#include <cstddef>
#include <cstdint>

namespace bertfast {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Longest row (LayerNorm hidden size, softmax key length) the row kernels accept: a row is
// cached in shared memory as fp32 (64 KiB at this size; above 48 KiB the kernels opt in to
// the larger carve-out every sm_80+ GPU has).
constexpr int64_t kMaxRowElements = 16384;

const char* cuda_error_string(int code);
// Makes `device` current for the launches that follow on this thread.
int use_device(int device);
// Version of the CUDA runtime linked into the extension (e.g. 13000), and of the driver (0 if none).
int cuda_runtime_version();
int cuda_driver_version();

// ---- LayerNorm(x + linear_bias + residual) over rows of length `hidden` -------------------
// residual (rows, hidden) and linear_bias (hidden) may be null.  mean/rstd: (rows,) fp32.
int layer_norm_forward(DType dtype, const void* x, const void* residual, const void* linear_bias, const void* weight,
                       const void* bias, void* y, float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                       void* stream);

// Scratch floats layer_norm_backward / embedding_layer_norm_backward need.
int64_t layer_norm_backward_workspace_floats(int64_t rows, int64_t hidden);

// dx = d/dh of the loss, where h = x + linear_bias + residual (so dresidual = dx too);
// dweight, dbias (hidden) in `dtype`; dlinear_bias (hidden) may be null when not wanted.
// The weight/bias/linear-bias reductions run in a fixed order: bitwise reproducible.
int layer_norm_backward(DType dtype, const void* dy, const void* x, const void* residual, const void* linear_bias,
                        const void* weight, const float* mean, const float* rstd, void* dx, void* dweight, void* dbias,
                        void* dlinear_bias, float* workspace, int64_t rows, int64_t hidden, void* stream);

// ---- LayerNorm(word[input_ids] + position[position_ids] + token_type[token_type_ids]) ------
// The three int64 index arrays have `rows` entries; an id outside its table turns that
// output row (and its mean/rstd) into NaN instead of reading out of bounds.
struct EmbeddingTables {
    const int64_t* input_ids;
    const int64_t* position_ids;
    const int64_t* token_type_ids;
    const void* word;
    const void* position;
    const void* token_type;
    int64_t word_rows;
    int64_t position_rows;
    int64_t token_type_rows;
};

int embedding_layer_norm_forward(DType dtype, const EmbeddingTables& tables, const void* weight, const void* bias,
                                 void* y, float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                                 void* stream);

// dsum: gradient of the summed embeddings (rows, hidden); the tables' gradients are its
// scatter-add by id, left to the caller.
int embedding_layer_norm_backward(DType dtype, const void* dy, const EmbeddingTables& tables, const void* weight,
                                  const float* mean, const float* rstd, void* dsum, void* dweight, void* dbias,
                                  float* workspace, int64_t rows, int64_t hidden, void* stream);

// ---- gelu_erf(x + bias), bias broadcast over rows of length `hidden` -----------------------
int bias_gelu_forward(DType dtype, const void* x, const void* bias, void* y, int64_t rows, int64_t hidden,
                      void* stream);
int64_t bias_gelu_backward_workspace_floats(int64_t rows, int64_t hidden);
int bias_gelu_backward(DType dtype, const void* dy, const void* x, const void* bias, void* dx, void* dbias,
                       float* workspace, int64_t rows, int64_t hidden, void* stream);

// ---- softmax(scores * scale) over the last dim with a key-padding mask ---------------------
// scores (fp32) and probs (`dtype`): (batch, rows_per_batch, seq_k), rows_per_batch = heads * seq_q;
// mask: (batch, seq_k) bytes, nonzero = keep, or null.  Masked keys get probability 0; a row
// with every key masked is all zeros.
int masked_softmax_forward(DType dtype, const float* scores, const uint8_t* mask, void* probs, int64_t batch,
                           int64_t rows_per_batch, int64_t seq_k, float scale, void* stream);
// dscores (fp32) = scale * probs * (dprobs - sum(dprobs * probs)), dprobs in `dtype`, with the
// probabilities recomputed in fp32 from the scores and the mask of the forward.
int masked_softmax_backward(DType dtype, const void* dprobs, const float* scores, const uint8_t* mask,
                            float* dscores, int64_t batch, int64_t rows_per_batch, int64_t seq_k, float scale,
                            void* stream);

}  // namespace cuda
}  // namespace bertfast
