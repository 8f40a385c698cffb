// LayerNorm kernels: residual (+ linear bias) LayerNorm and the fused BERT embedding LayerNorm.
//
// Math, per row of length H (statistics in fp32):
//   h     = x + linear_bias + residual            or   word[id] + token_type[tt] + position[pos]
//   mean  = sum(h) / H,   rstd = 1 / sqrt(sum((h - mean)^2) / H + eps)      (exact two-pass)
//   y     = (h - mean) * rstd * weight + bias
// Backward, with xhat = (h - mean) * rstd and g = dy * weight:
//   dh       = rstd * (g - mean(g) - xhat * mean(g * xhat))    (= dx = dresidual = dsum)
//   dweight  = sum_rows(dy * xhat),  dbias = sum_rows(dy),  dlinear_bias = sum_rows(dh)
//
// Memory traffic (rows R, element size s): forward reads the 1-3 inputs and writes y
// (R*H*s each) plus 8 bytes of mean/rstd per row; h is never written -- the backward
// recomputes it, which costs the same bytes as saving it would and no extra memory.
// The backward's row kernel reads dy and the inputs and writes dh; its column kernel
// reads them again (and dh when dlinear_bias is wanted) to form the weight/bias sums in a
// fixed order -- the same two-kernel split PyTorch's own LayerNorm backward makes.
//
// Kernels: layer_norm_forward_kernel (row), layer_norm_backward_input_kernel (row),
// layer_norm_param_partials_kernel (column), then detail::sum_partials_kernel.
// The row input (plain or embedding gather) is a small loader struct, so one kernel body
// serves both ops.

#include "common.cuh"

namespace bertfast {
namespace cuda {
namespace {

using namespace detail;

// h = x + linear_bias + residual (either addend may be absent).
template <typename T>
struct ResidualInput {
    const T* __restrict__ x;
    const T* __restrict__ residual;
    const T* __restrict__ linear_bias;
    int hidden;

    template <int VEC>
    __device__ __forceinline__ void load(int64_t row, int col, float (&h)[VEC]) const {
        const int64_t offset = row * hidden + col;
        load_floats<T, VEC>(x + offset, h);
        if (linear_bias != nullptr) {
            float b[VEC];
            load_floats<T, VEC>(linear_bias + col, b);
#pragma unroll
            for (int k = 0; k < VEC; ++k) h[k] += b[k];
        }
        if (residual != nullptr) {
            float r[VEC];
            load_floats<T, VEC>(residual + offset, r);
#pragma unroll
            for (int k = 0; k < VEC; ++k) h[k] += r[k];
        }
    }
};

// h = word[input_ids[row]] + token_type[token_type_ids[row]] + position[position_ids[row]].
// An id outside its table yields NaN for the whole row rather than an out-of-bounds read.
template <typename T>
struct EmbeddingInput {
    const int64_t* __restrict__ input_ids;
    const int64_t* __restrict__ position_ids;
    const int64_t* __restrict__ token_type_ids;
    const T* __restrict__ word;
    const T* __restrict__ position;
    const T* __restrict__ token_type;
    int64_t word_rows;
    int64_t position_rows;
    int64_t token_type_rows;
    int hidden;

    template <int VEC>
    __device__ __forceinline__ void load(int64_t row, int col, float (&h)[VEC]) const {
        const int64_t w = input_ids[row];
        const int64_t p = position_ids[row];
        const int64_t t = token_type_ids[row];
        if (w < 0 || w >= word_rows || p < 0 || p >= position_rows || t < 0 || t >= token_type_rows) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) h[k] = __int_as_float(0x7fffffff);  // NaN
            return;
        }
        float a[VEC];
        load_floats<T, VEC>(word + w * hidden + col, h);
        load_floats<T, VEC>(token_type + t * hidden + col, a);
#pragma unroll
        for (int k = 0; k < VEC; ++k) h[k] += a[k];
        load_floats<T, VEC>(position + p * hidden + col, a);
#pragma unroll
        for (int k = 0; k < VEC; ++k) h[k] += a[k];
    }
};

template <typename T, int VEC, typename Input>
__global__ void layer_norm_forward_kernel(Input input, const T* __restrict__ weight, const T* __restrict__ bias,
                                          T* __restrict__ y, float* __restrict__ mean_out,
                                          float* __restrict__ rstd_out, int64_t rows, int hidden, int iters,
                                          float eps) {
    extern __shared__ float smem[];
    float* scratch = smem;
    float* cache = smem + kScratchFloats;
    const float inv_hidden = 1.f / static_cast<float>(hidden);
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        float sum = 0.f;
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= hidden) break;
            float h[VEC];
            input.template load<VEC>(row, col, h);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                cache[cache_index(j, k, VEC)] = h[k];
                sum += h[k];
            }
        }
        const float mean = block_sum(sum, scratch) * inv_hidden;

        float squares = 0.f;
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= hidden) break;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float d = cache[cache_index(j, k, VEC)] - mean;
                squares += d * d;
            }
        }
        const float rstd = rsqrtf(block_sum(squares, scratch) * inv_hidden + eps);

        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= hidden) break;
            float w[VEC], b[VEC], out[VEC];
            load_floats<T, VEC>(weight + col, w);
            load_floats<T, VEC>(bias + col, b);
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = (cache[cache_index(j, k, VEC)] - mean) * rstd * w[k] + b[k];
            store_floats<T, VEC>(y + row * hidden + col, out);
        }
        if (threadIdx.x == 0) {
            mean_out[row] = mean;
            rstd_out[row] = rstd;
        }
    }
}

template <typename T, int VEC, typename Input>
__global__ void layer_norm_backward_input_kernel(Input input, const T* __restrict__ dy, const T* __restrict__ weight,
                                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                                 T* __restrict__ dh_out, int64_t rows, int hidden, int iters,
                                                 int cache_floats) {
    extern __shared__ float smem[];
    float* scratch = smem;
    float* xhat_cache = smem + kScratchFloats;
    float* g_cache = xhat_cache + cache_floats;
    const float inv_hidden = 1.f / static_cast<float>(hidden);
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float mu = mean[row];
        const float rs = rstd[row];
        float sum_g = 0.f, sum_g_xhat = 0.f;
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= hidden) break;
            float h[VEC], d[VEC], w[VEC];
            input.template load<VEC>(row, col, h);
            load_floats<T, VEC>(dy + row * hidden + col, d);
            load_floats<T, VEC>(weight + col, w);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float xhat = (h[k] - mu) * rs;
                const float g = d[k] * w[k];
                xhat_cache[cache_index(j, k, VEC)] = xhat;
                g_cache[cache_index(j, k, VEC)] = g;
                sum_g += g;
                sum_g_xhat += g * xhat;
            }
        }
        const float mean_g = block_sum(sum_g, scratch) * inv_hidden;
        const float mean_g_xhat = block_sum(sum_g_xhat, scratch) * inv_hidden;
        for (int j = 0; j < iters; ++j) {
            const int col = (j * blockDim.x + threadIdx.x) * VEC;
            if (col >= hidden) break;
            float out[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const int c = cache_index(j, k, VEC);
                out[k] = rs * (g_cache[c] - mean_g - xhat_cache[c] * mean_g_xhat);
            }
            store_floats<T, VEC>(dh_out + row * hidden + col, out);
        }
    }
}

// Per (column tile, row chunk): partial sums of dy * xhat, dy and (if dh != null) dh.
// partials layout: [chunk][output][hidden], outputs = dh ? 3 : 2.
template <typename T, int VEC, typename Input>
__global__ void layer_norm_param_partials_kernel(Input input, const T* __restrict__ dy, const T* __restrict__ dh,
                                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                                 float* __restrict__ partials, int64_t rows, int hidden,
                                                 int64_t rows_per_chunk) {
    __shared__ float lane_sums[kRowLanes * 32 * VEC];
    const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
    const int64_t chunk = blockIdx.y;
    const int64_t begin = chunk * rows_per_chunk;
    const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
    float acc_dweight[VEC], acc_dbias[VEC], acc_dh[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc_dweight[k] = acc_dbias[k] = acc_dh[k] = 0.f;
    if (col < hidden) {
        for (int64_t row = begin + threadIdx.y; row < end; row += kRowLanes) {
            float h[VEC], d[VEC];
            input.template load<VEC>(row, col, h);
            load_floats<T, VEC>(dy + row * hidden + col, d);
            const float mu = mean[row];
            const float rs = rstd[row];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                acc_dweight[k] += d[k] * (h[k] - mu) * rs;
                acc_dbias[k] += d[k];
            }
            if (dh != nullptr) {
                load_floats<T, VEC>(dh + row * hidden + col, d);
#pragma unroll
                for (int k = 0; k < VEC; ++k) acc_dh[k] += d[k];
            }
        }
    }
    const int outputs = dh != nullptr ? 3 : 2;
    float* base = partials + chunk * outputs * hidden;
    reduce_row_lanes<VEC>(acc_dweight, lane_sums, base, col, hidden);
    reduce_row_lanes<VEC>(acc_dbias, lane_sums, base + hidden, col, hidden);
    if (dh != nullptr) reduce_row_lanes<VEC>(acc_dh, lane_sums, base + 2 * hidden, col, hidden);
}

template <typename T, int VEC, typename Input>
cudaError_t forward(const Input& input, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                    int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
    const RowLaunch launch = row_launch(rows, hidden, VEC, 1);
    auto kernel = layer_norm_forward_kernel<T, VEC, Input>;
    cudaError_t err = allow_smem(kernel, launch.smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<launch.grid, launch.threads, launch.smem_bytes, stream>>>(
        input, static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y), mean, rstd, rows,
        static_cast<int>(hidden), launch.iters, eps);
    return cudaGetLastError();
}

template <typename T, int VEC, typename Input>
cudaError_t backward(const Input& input, const void* dy, const void* weight, const float* mean, const float* rstd,
                     void* dh, void* dweight, void* dbias, void* dlinear_bias, float* workspace, int64_t rows,
                     int64_t hidden, cudaStream_t stream) {
    const RowLaunch launch = row_launch(rows, hidden, VEC, 2);
    auto row_kernel = layer_norm_backward_input_kernel<T, VEC, Input>;
    cudaError_t err = allow_smem(row_kernel, launch.smem_bytes);
    if (err != cudaSuccess) return err;
    row_kernel<<<launch.grid, launch.threads, launch.smem_bytes, stream>>>(
        input, static_cast<const T*>(dy), static_cast<const T*>(weight), mean, rstd, static_cast<T*>(dh), rows,
        static_cast<int>(hidden), launch.iters, launch.cache_floats);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    const ColumnLaunch columns = column_launch(rows, hidden, VEC);
    const T* dh_for_sum = dlinear_bias != nullptr ? static_cast<const T*>(dh) : nullptr;
    layer_norm_param_partials_kernel<T, VEC, Input><<<columns.grid, columns.block, 0, stream>>>(
        input, static_cast<const T*>(dy), dh_for_sum, mean, rstd, workspace, rows, static_cast<int>(hidden),
        columns.rows_per_chunk);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    return launch_sum_partials<T>(workspace, columns.chunks, dlinear_bias != nullptr ? 3 : 2, hidden,
                                  static_cast<T*>(dweight), static_cast<T*>(dbias), static_cast<T*>(dlinear_bias),
                                  stream);
}

template <typename T>
EmbeddingInput<T> embedding_input(const EmbeddingTables& t, int64_t hidden) {
    return EmbeddingInput<T>{t.input_ids,
                             t.position_ids,
                             t.token_type_ids,
                             static_cast<const T*>(t.word),
                             static_cast<const T*>(t.position),
                             static_cast<const T*>(t.token_type),
                             t.word_rows,
                             t.position_rows,
                             t.token_type_rows,
                             static_cast<int>(hidden)};
}

bool row_length_ok(int64_t hidden) { return hidden >= 1 && hidden <= kMaxRowElements; }

}  // namespace

int layer_norm_forward(DType dtype, const void* x, const void* residual, const void* linear_bias, const void* weight,
                       const void* bias, void* y, float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                       void* stream) {
    if (!row_length_ok(hidden)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        const bool vec_ok = vectorizable<T>(hidden, {x, residual, linear_bias, weight, bias, y});
        return with_vec<T>(vec_ok, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const ResidualInput<T> input{static_cast<const T*>(x), static_cast<const T*>(residual),
                                         static_cast<const T*>(linear_bias), static_cast<int>(hidden)};
            return static_cast<int>(forward<T, VEC>(input, weight, bias, y, mean, rstd, rows, hidden, eps,
                                                    static_cast<cudaStream_t>(stream)));
        });
    });
}

int64_t layer_norm_backward_workspace_floats(int64_t rows, int64_t hidden) {
    return detail::column_chunks(rows) * 3 * hidden;
}

int layer_norm_backward(DType dtype, const void* dy, const void* x, const void* residual, const void* linear_bias,
                        const void* weight, const float* mean, const float* rstd, void* dx, void* dweight, void* dbias,
                        void* dlinear_bias, float* workspace, int64_t rows, int64_t hidden, void* stream) {
    if (!row_length_ok(hidden)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;  // the caller zero-fills the parameter gradients
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        const bool vec_ok =
            vectorizable<T>(hidden, {dy, x, residual, linear_bias, weight, dx, dweight, dbias, dlinear_bias});
        return with_vec<T>(vec_ok, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const ResidualInput<T> input{static_cast<const T*>(x), static_cast<const T*>(residual),
                                         static_cast<const T*>(linear_bias), static_cast<int>(hidden)};
            return static_cast<int>(backward<T, VEC>(input, dy, weight, mean, rstd, dx, dweight, dbias, dlinear_bias,
                                                     workspace, rows, hidden, static_cast<cudaStream_t>(stream)));
        });
    });
}

int embedding_layer_norm_forward(DType dtype, const EmbeddingTables& tables, const void* weight, const void* bias,
                                 void* y, float* mean, float* rstd, int64_t rows, int64_t hidden, float eps,
                                 void* stream) {
    if (!row_length_ok(hidden)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        const bool vec_ok =
            vectorizable<T>(hidden, {tables.word, tables.position, tables.token_type, weight, bias, y});
        const EmbeddingInput<T> input = embedding_input<T>(tables, hidden);
        return with_vec<T>(vec_ok, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            return static_cast<int>(forward<T, VEC>(input, weight, bias, y, mean, rstd, rows, hidden, eps,
                                                    static_cast<cudaStream_t>(stream)));
        });
    });
}

int embedding_layer_norm_backward(DType dtype, const void* dy, const EmbeddingTables& tables, const void* weight,
                                  const float* mean, const float* rstd, void* dsum, void* dweight, void* dbias,
                                  float* workspace, int64_t rows, int64_t hidden, void* stream) {
    if (!row_length_ok(hidden)) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        const bool vec_ok = vectorizable<T>(
            hidden, {dy, tables.word, tables.position, tables.token_type, weight, dsum, dweight, dbias});
        const EmbeddingInput<T> input = embedding_input<T>(tables, hidden);
        return with_vec<T>(vec_ok, [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            return static_cast<int>(backward<T, VEC>(input, dy, weight, mean, rstd, dsum, dweight, dbias, nullptr,
                                                     workspace, rows, hidden, static_cast<cudaStream_t>(stream)));
        });
    });
}

}  // namespace cuda
}  // namespace bertfast
