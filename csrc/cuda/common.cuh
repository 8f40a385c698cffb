// Device helpers shared by the kernels in csrc/cuda/*.cu: dtype conversion, 16-byte vector
// loads, deterministic warp/block reductions, and the launch geometry of the two kernel
// shapes every op here is built from:
//
//   * row kernels: one block per row (grid-stride over rows).  Thread t owns the elements
//     [(j * threads + t) * VEC, ... + VEC) for j < iters and keeps them, as fp32, in shared
//     memory laid out so that consecutive threads touch consecutive words (no bank
//     conflicts).  A thread only reads back what it wrote, so the cache needs no barrier;
//     the barriers are in the block reductions.
//   * column kernels: blocks of (32 column vectors) x (kRowLanes rows) walk a fixed chunk of
//     rows and leave one fp32 partial sum per column and chunk; sum_partials_kernel adds the
//     chunks in order.  The chunking depends only on the shape, so a reduction over rows
//     (dweight, dbias) is bitwise reproducible.
//
// Only CUDA's own headers are included: torch's CUDA headers do not compile against the CPU
// torch wheel, and nothing here needs them.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "launchers.h"

namespace bertfast {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Conversions and vector memory access
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// VEC elements of T moved as one access: 16 bytes when VEC == kVec<T>.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[VEC]) {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&in)[VEC]) {
    Pack<T, VEC> pack;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The vector width a launch can use: 16-byte accesses when every row starts 16-byte aligned
// (all base pointers aligned, row length a multiple of the vector), single elements otherwise.
template <typename T>
inline bool vectorizable(int64_t row_len, std::initializer_list<const void*> pointers) {
    if (row_len % kVec<T> != 0) return false;
    for (const void* p : pointers)
        if (p != nullptr && !aligned16(p)) return false;
    return true;
}

// Calls f(std::integral_constant<int, VEC>) with the 16-byte width or 1.
template <typename T, typename F>
inline int with_vec(bool vector_ok, F&& f) {
    if (vector_ok) return f(std::integral_constant<int, kVec<T>>{});
    return f(std::integral_constant<int, 1>{});
}

// Calls f(T{}) with the element type of `dtype`.
template <typename F>
inline int dispatch_dtype(DType dtype, F&& f) {
    switch (dtype) {
        case DType::Float32:
            return f(float{});
        case DType::Float16:
            return f(__half{});
        case DType::BFloat16:
            return f(__nv_bfloat16{});
    }
    return static_cast<int>(cudaErrorInvalidValue);
}

// ---------------------------------------------------------------------------------------------
// Reductions (fixed butterfly order: every lane gets the same, reproducible result)
// ---------------------------------------------------------------------------------------------

struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Floats of shared memory a block reduction needs, kept at the start of the dynamic buffer.
constexpr int kScratchFloats = 64;

// Block-wide reduction; blockDim.x must be a multiple of 32.  The leading barrier lets the
// previous call's readers of scratch finish before it is overwritten.
template <typename Op>
__device__ float block_reduce(float v, float* scratch, Op op, float identity) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_reduce(lane < warps ? scratch[lane] : identity, op);
        if (lane == 0) scratch[32] = v;
    }
    __syncthreads();
    return scratch[32];
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, SumOp{}, 0.f); }
__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce(v, scratch, MaxOp{}, -INFINITY);
}

// Index in a row kernel's shared cache of element k of thread `tid`'s j-th vector.
__device__ __forceinline__ int cache_index(int j, int k, int vec) { return (j * vec + k) * blockDim.x + threadIdx.x; }

// ---------------------------------------------------------------------------------------------
// Launch geometry
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMaxGridX = 1 << 30;
constexpr int kMaxRowThreads = 512;

struct RowLaunch {
    unsigned grid;
    int threads;
    int iters;          // vectors per thread per row
    int cache_floats;   // shared-memory floats per cached row array
    size_t smem_bytes;  // scratch + cached arrays
};

inline RowLaunch row_launch(int64_t rows, int64_t row_len, int vec, int cached_arrays) {
    RowLaunch launch;
    const int64_t vectors = (row_len + vec - 1) / vec;
    const int64_t threads = ((vectors + 31) / 32) * 32;
    launch.threads = static_cast<int>(threads < 32 ? 32 : (threads > kMaxRowThreads ? kMaxRowThreads : threads));
    launch.iters = static_cast<int>((vectors + launch.threads - 1) / launch.threads);
    launch.cache_floats = launch.iters * vec * launch.threads;
    launch.smem_bytes = sizeof(float) * (kScratchFloats + static_cast<size_t>(cached_arrays) * launch.cache_floats);
    launch.grid = static_cast<unsigned>(rows < kMaxGridX ? rows : kMaxGridX);
    return launch;
}

// Above 48 KiB of dynamic shared memory a kernel must opt in (sm_80: up to 163 KiB, sm_90: 227 KiB).
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

constexpr int kRowLanes = 8;        // rows a column-kernel block walks at once
constexpr int64_t kMaxChunks = 128;  // row chunks of a column reduction
constexpr int64_t kMinChunkRows = 32;

struct ColumnLaunch {
    dim3 grid;
    dim3 block;
    int64_t chunks;
    int64_t rows_per_chunk;
};

// Chunks depend on `rows` only (not on the vector width or the GPU): reproducible sums.
inline int64_t column_chunks(int64_t rows) {
    int64_t chunks = (rows + kMinChunkRows - 1) / kMinChunkRows;
    if (chunks < 1) chunks = 1;
    return chunks > kMaxChunks ? kMaxChunks : chunks;
}

inline ColumnLaunch column_launch(int64_t rows, int64_t hidden, int vec) {
    ColumnLaunch launch;
    launch.chunks = column_chunks(rows);
    launch.rows_per_chunk = (rows + launch.chunks - 1) / launch.chunks;
    if (launch.rows_per_chunk < 1) launch.rows_per_chunk = 1;
    const int64_t tile = 32 * vec;
    launch.grid = dim3(static_cast<unsigned>((hidden + tile - 1) / tile), static_cast<unsigned>(launch.chunks));
    launch.block = dim3(32, kRowLanes);
    return launch;
}

// Adds the kRowLanes row lanes' accumulators of one column tile in lane order and writes
// them to out[col .. col + VEC).  Every thread of the block must call it.
template <int VEC>
__device__ void reduce_row_lanes(const float (&acc)[VEC], float* lane_sums, float* __restrict__ out, int col,
                                 int hidden) {
    constexpr int kTile = 32 * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) lane_sums[threadIdx.y * kTile + threadIdx.x * VEC + k] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0 && col < hidden) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            float s = 0.f;
#pragma unroll
            for (int lane = 0; lane < kRowLanes; ++lane) s += lane_sums[lane * kTile + threadIdx.x * VEC + k];
            out[col + k] = s;
        }
    }
    __syncthreads();
}

// out_p[col] = sum over chunks c (in order) of partials[(c * outputs + p) * hidden + col].
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partials, int64_t chunks, int outputs, int hidden,
                                    T* __restrict__ out0, T* __restrict__ out1, T* __restrict__ out2) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<int64_t>(outputs) * hidden) return;
    const int p = static_cast<int>(i / hidden);
    const int col = static_cast<int>(i % hidden);
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += partials[(c * outputs + p) * hidden + col];
    T* out = p == 0 ? out0 : (p == 1 ? out1 : out2);
    out[col] = from_float<T>(s);
}

template <typename T>
inline cudaError_t launch_sum_partials(const float* partials, int64_t chunks, int outputs, int64_t hidden, T* out0,
                                       T* out1, T* out2, cudaStream_t stream) {
    const int64_t total = outputs * hidden;
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
    sum_partials_kernel<T>
        <<<blocks, threads, 0, stream>>>(partials, chunks, outputs, static_cast<int>(hidden), out0, out1, out2);
    return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace bertfast
