// Scaled, key-padding-masked softmax: the middle of the extension's attention
// (scores = q @ k^T and out = probs @ v are batched GEMMs).
//
// The scores and their gradient are fp32 whatever the probabilities' dtype T: attention
// scores can be large (|q . k| * scale ~ 1e4 for q ~ 30, k ~ 40, head 64), where fp16's
// spacing (8) or bf16's (64) would decide the softmax.  probs and dprobs are T.  The backward
// recomputes the probabilities in fp32 from the scores: probabilities rounded to T lose the
// 1 - p of a dominant key, which the gradient of every other key depends on.
//
// Math per row of scores (batch b, head, query) over seq_k keys, in fp32:
//   s_j     = scores_j * scale        if mask[b, j] != 0,   -inf otherwise
//   probs_j = exp(s_j - max(s)) / sum_j exp(s_j - max(s))
// A masked key gets exactly 0; a row whose keys are all masked is all zeros (never NaN).
// Backward: dscores_j = scale * probs_j * (dprobs_j - sum_i dprobs_i * probs_i)
// (masked keys have probs 0, so their gradient is exactly 0 as well).
//
// Memory traffic (R rows of S keys, s bytes per element of T, the mask row staying in
// cache): forward reads fp32 scores (4*R*S) and writes probs (s*R*S); backward reads scores
// and dprobs (4*R*S + s*R*S) and writes fp32 dscores (4*R*S).  Every access moves VEC = 4
// elements (16 bytes of fp32, 8 of fp16/bf16) when the rows allow it.  One block per row; the
// row stays in shared memory as fp32 between the passes (max, sum, normalise).

#include "common.cuh"

namespace bertfast {
namespace cuda {
namespace {

using namespace detail;

// Leaves the probabilities of one row of scores, in fp32, in this thread's slots of `cache`
// (all zeros when every key is masked).  Every thread of the block must call it.
template <int VEC>
__device__ void softmax_row(const float* __restrict__ in, const uint8_t* __restrict__ keep, int seq_k, int iters,
                            float scale, float* cache, float* scratch) {
    float row_max = -INFINITY;
    for (int j = 0; j < iters; ++j) {
        const int col = (j * blockDim.x + threadIdx.x) * VEC;
        if (col >= seq_k) break;
        float v[VEC];
        load_floats<float, VEC>(in + col, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const float s = (keep == nullptr || keep[col + k] != 0) ? v[k] * scale : -INFINITY;
            cache[cache_index(j, k, VEC)] = s;
            row_max = fmaxf(row_max, s);
        }
    }
    row_max = block_max(row_max, scratch);
    const bool any_kept = row_max != -INFINITY;  // the same for the whole block

    float sum = 0.f;
    for (int j = 0; j < iters; ++j) {
        const int col = (j * blockDim.x + threadIdx.x) * VEC;
        if (col >= seq_k) break;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int c = cache_index(j, k, VEC);
            const float e = any_kept ? expf(cache[c] - row_max) : 0.f;  // exp(-inf) = 0 for masked keys
            cache[c] = e;
            sum += e;
        }
    }
    const float total = block_sum(sum, scratch);  // >= 1 (the maximum's exp(0)) unless every key is masked
    const float inv_sum = any_kept ? 1.f / total : 0.f;
    for (int j = 0; j < iters; ++j) {
        const int col = (j * blockDim.x + threadIdx.x) * VEC;
        if (col >= seq_k) break;
#pragma unroll
        for (int k = 0; k < VEC; ++k) cache[cache_index(j, k, VEC)] *= inv_sum;
    }
}

template <typename T, int VEC>
__global__ void masked_softmax_forward_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ mask,
                                              T* __restrict__ probs, int64_t rows, int64_t rows_per_batch,
                                              int seq_k, int iters, float scale) {
    extern __shared__ float smem[];
    float* scratch = smem;
    float* cache = smem + kScratchFloats;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const uint8_t* keep = mask != nullptr ? mask + (row / rows_per_batch) * seq_k : nullptr;
        softmax_row<VEC>(scores + row * seq_k, keep, seq_k, iters, scale, cache, scratch);
        T* out = probs + row * seq_k;
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= seq_k) break;
            float p[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) p[k] = cache[cache_index(j, k, VEC)];
            store_floats<T, VEC>(out + col, p);
        }
    }
}

template <typename T, int VEC>
__global__ void masked_softmax_backward_kernel(const T* __restrict__ dprobs, const float* __restrict__ scores,
                                               const uint8_t* __restrict__ mask, float* __restrict__ dscores,
                                               int64_t rows, int64_t rows_per_batch, int seq_k, int iters,
                                               int cache_floats, float scale) {
    extern __shared__ float smem[];
    float* scratch = smem;
    float* p_cache = smem + kScratchFloats;
    float* dp_cache = p_cache + cache_floats;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const int64_t offset = row * seq_k;
        const uint8_t* keep = mask != nullptr ? mask + (row / rows_per_batch) * seq_k : nullptr;
        softmax_row<VEC>(scores + offset, keep, seq_k, iters, scale, p_cache, scratch);
        float dot = 0.f;
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= seq_k) break;
            float dp[VEC];
            load_floats<T, VEC>(dprobs + offset + col, dp);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const int c = cache_index(j, k, VEC);
                dp_cache[c] = dp[k];
                dot += p_cache[c] * dp[k];
            }
        }
        dot = block_sum(dot, scratch);
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= seq_k) break;
            float ds[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const int c = cache_index(j, k, VEC);
                ds[k] = scale * p_cache[c] * (dp_cache[c] - dot);
            }
            store_floats<float, VEC>(dscores + offset + col, ds);
        }
    }
}

bool row_length_ok(int64_t seq_k) { return seq_k >= 1 && seq_k <= kMaxRowElements; }

}  // namespace

// The vector width is fp32's (4) for every array: a 16-byte access of fp32, 8 bytes of fp16/bf16.

int masked_softmax_forward(DType dtype, const float* scores, const uint8_t* mask, void* probs, int64_t batch,
                           int64_t rows_per_batch, int64_t seq_k, float scale, void* stream) {
    if (!row_length_ok(seq_k)) return cudaErrorInvalidValue;
    const int64_t rows = batch * rows_per_batch;
    if (rows == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        return with_vec<float>(vectorizable<float>(seq_k, {scores, probs}), [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const RowLaunch launch = row_launch(rows, seq_k, VEC, 1);
            auto kernel = masked_softmax_forward_kernel<T, VEC>;
            cudaError_t err = allow_smem(kernel, launch.smem_bytes);
            if (err != cudaSuccess) return static_cast<int>(err);
            kernel<<<launch.grid, launch.threads, launch.smem_bytes, static_cast<cudaStream_t>(stream)>>>(
                scores, mask, static_cast<T*>(probs), rows, rows_per_batch, static_cast<int>(seq_k), launch.iters,
                scale);
            return static_cast<int>(cudaGetLastError());
        });
    });
}

int masked_softmax_backward(DType dtype, const void* dprobs, const float* scores, const uint8_t* mask,
                            float* dscores, int64_t batch, int64_t rows_per_batch, int64_t seq_k, float scale,
                            void* stream) {
    if (!row_length_ok(seq_k)) return cudaErrorInvalidValue;
    const int64_t rows = batch * rows_per_batch;
    if (rows == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        return with_vec<float>(vectorizable<float>(seq_k, {dprobs, scores, dscores}), [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const RowLaunch launch = row_launch(rows, seq_k, VEC, 2);
            auto kernel = masked_softmax_backward_kernel<T, VEC>;
            cudaError_t err = allow_smem(kernel, launch.smem_bytes);
            if (err != cudaSuccess) return static_cast<int>(err);
            kernel<<<launch.grid, launch.threads, launch.smem_bytes, static_cast<cudaStream_t>(stream)>>>(
                static_cast<const T*>(dprobs), scores, mask, dscores, rows, rows_per_batch, static_cast<int>(seq_k),
                launch.iters, launch.cache_floats, scale);
            return static_cast<int>(cudaGetLastError());
        });
    });
}

}  // namespace cuda
}  // namespace bertfast
