// Bias + GELU (exact, erf form), the epilogue of BERT's intermediate dense layer.
//
// Math (fp32 inside), z = x + bias with bias broadcast over rows of length H:
//   y       = gelu(z) = 0.5 * z * (1 + erf(z / sqrt(2)))
//   gelu'(z) = 0.5 * (1 + erf(z / sqrt(2))) + z * exp(-z^2 / 2) / sqrt(2 * pi)
//   dx      = dy * gelu'(z),   dbias = sum_rows(dx)      (summed in fp32 before rounding)
//
// Memory traffic (N = rows * H elements of s bytes): forward reads x, writes y (2*N*s);
// backward reads dy and x, writes dx (3*N*s) plus fp32 partial sums of dbias
// (chunks * H * 4 bytes, chunks <= 128).  Both are purely bandwidth-bound.
//
// Forward: a flat grid-stride loop over 16-byte vectors.  Backward: a column kernel (see
// common.cuh) that writes dx and accumulates dbias for its chunk of rows; the chunks are
// added in a fixed order, so dbias is bitwise reproducible.

#include "common.cuh"

namespace bertfast {
namespace cuda {
namespace {

using namespace detail;

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.f + erff(z * kInvSqrt2)); }

__device__ __forceinline__ float gelu_grad(float z) {
    return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
}

template <typename T, int VEC>
__global__ void bias_gelu_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                         int64_t vectors, int hidden) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors; i += stride) {
        const int64_t offset = i * VEC;
        const int col = static_cast<int>(offset % hidden);  // a vector never straddles rows (hidden % VEC == 0)
        float v[VEC], b[VEC];
        load_floats<T, VEC>(x + offset, v);
        load_floats<T, VEC>(bias + col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = gelu(v[k] + b[k]);
        store_floats<T, VEC>(y + offset, v);
    }
}

template <typename T, int VEC>
__global__ void bias_gelu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                          const T* __restrict__ bias, T* __restrict__ dx,
                                          float* __restrict__ partials, int64_t rows, int hidden,
                                          int64_t rows_per_chunk) {
    __shared__ float lane_sums[kRowLanes * 32 * VEC];
    const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
    const int64_t chunk = blockIdx.y;
    const int64_t begin = chunk * rows_per_chunk;
    const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    if (col < hidden) {
        float b[VEC];
        load_floats<T, VEC>(bias + col, b);
        for (int64_t row = begin + threadIdx.y; row < end; row += kRowLanes) {
            const int64_t offset = row * hidden + col;
            float v[VEC], d[VEC];
            load_floats<T, VEC>(x + offset, v);
            load_floats<T, VEC>(dy + offset, d);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                d[k] *= gelu_grad(v[k] + b[k]);
                acc[k] += d[k];
            }
            store_floats<T, VEC>(dx + offset, d);
        }
    }
    reduce_row_lanes<VEC>(acc, lane_sums, partials + chunk * hidden, col, hidden);
}

constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 1 << 16;

}  // namespace

int bias_gelu_forward(DType dtype, const void* x, const void* bias, void* y, int64_t rows, int64_t hidden,
                      void* stream) {
    if (hidden < 1 || hidden > INT32_MAX) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        return with_vec<T>(vectorizable<T>(hidden, {x, bias, y}), [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const int64_t vectors = rows * hidden / VEC;
            int64_t blocks = (vectors + kElementwiseThreads - 1) / kElementwiseThreads;
            if (blocks > kMaxElementwiseBlocks) blocks = kMaxElementwiseBlocks;
            bias_gelu_forward_kernel<T, VEC>
                <<<static_cast<unsigned>(blocks), kElementwiseThreads, 0, static_cast<cudaStream_t>(stream)>>>(
                    static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), vectors,
                    static_cast<int>(hidden));
            return static_cast<int>(cudaGetLastError());
        });
    });
}

int64_t bias_gelu_backward_workspace_floats(int64_t rows, int64_t hidden) {
    return detail::column_chunks(rows) * hidden;
}

int bias_gelu_backward(DType dtype, const void* dy, const void* x, const void* bias, void* dx, void* dbias,
                       float* workspace, int64_t rows, int64_t hidden, void* stream) {
    if (hidden < 1 || hidden > INT32_MAX) return cudaErrorInvalidValue;
    if (rows == 0) return cudaSuccess;  // the caller zero-fills dbias
    return dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        return with_vec<T>(vectorizable<T>(hidden, {dy, x, bias, dx, dbias}), [&](auto vec) {
            constexpr int VEC = decltype(vec)::value;
            const cudaStream_t s = static_cast<cudaStream_t>(stream);
            const ColumnLaunch launch = column_launch(rows, hidden, VEC);
            bias_gelu_backward_kernel<T, VEC><<<launch.grid, launch.block, 0, s>>>(
                static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(dx),
                workspace, rows, static_cast<int>(hidden), launch.rows_per_chunk);
            cudaError_t err = cudaGetLastError();
            if (err != cudaSuccess) return static_cast<int>(err);
            return static_cast<int>(launch_sum_partials<T>(workspace, launch.chunks, 1, hidden, static_cast<T*>(dbias),
                                                           nullptr, nullptr, s));
        });
    });
}

}  // namespace cuda
}  // namespace bertfast
