// CPU kernels of the extension (see kernels.h and, for the math, csrc/cuda/*.cu).
//
// Row-wise work (normalisation, softmax) runs in parallel over rows.  Reductions over
// rows (dweight, dbias, dlinear_bias) run in parallel over blocks of kColumnBlock columns,
// each block walking the rows in order, so their results do not depend on the thread count.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace bertfast {
namespace cpu {
namespace {

constexpr int64_t kColumnBlock = 64;

// Rows per parallel task: about 32K elements of work each.
int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

int64_t column_blocks(int64_t hidden) { return (hidden + kColumnBlock - 1) / kColumnBlock; }

// h[0:n] = (x + linear_bias + residual)[row, col0:col0+n]
template <typename T>
struct ResidualInput {
    const T* x;
    const T* residual;
    const T* linear_bias;
    int64_t hidden;

    void operator()(int64_t row, int64_t col0, int64_t n, Acc<T>* h) const {
        const int64_t offset = row * hidden + col0;
        for (int64_t i = 0; i < n; ++i) h[i] = static_cast<Acc<T>>(x[offset + i]);
        if (linear_bias != nullptr)
            for (int64_t i = 0; i < n; ++i) h[i] += static_cast<Acc<T>>(linear_bias[col0 + i]);
        if (residual != nullptr)
            for (int64_t i = 0; i < n; ++i) h[i] += static_cast<Acc<T>>(residual[offset + i]);
    }
};

// h[0:n] = (word[input_ids[row]] + token_type[token_type_ids[row]] + position[position_ids[row]])[col0:col0+n]
template <typename T>
struct EmbeddingInput {
    EmbeddingTables tables;
    int64_t hidden;

    void operator()(int64_t row, int64_t col0, int64_t n, Acc<T>* h) const {
        const T* word = static_cast<const T*>(tables.word) + tables.input_ids[row] * hidden + col0;
        const T* type = static_cast<const T*>(tables.token_type) + tables.token_type_ids[row] * hidden + col0;
        const T* position = static_cast<const T*>(tables.position) + tables.position_ids[row] * hidden + col0;
        for (int64_t i = 0; i < n; ++i)
            h[i] = static_cast<Acc<T>>(word[i]) + static_cast<Acc<T>>(type[i]) + static_cast<Acc<T>>(position[i]);
    }
};

template <typename T, typename Input>
void normalize_rows(const Input& input, const T* weight, const T* bias, T* y, Acc<T>* mean, Acc<T>* rstd,
                    int64_t rows, int64_t hidden, double eps) {
    using A = Acc<T>;
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        std::vector<A> h(hidden);
        for (int64_t row = begin; row < end; ++row) {
            input(row, 0, hidden, h.data());
            A sum = 0;
            for (int64_t i = 0; i < hidden; ++i) sum += h[i];
            const A mu = sum / static_cast<A>(hidden);
            A squares = 0;
            for (int64_t i = 0; i < hidden; ++i) squares += (h[i] - mu) * (h[i] - mu);
            const A rs = A(1) / std::sqrt(squares / static_cast<A>(hidden) + static_cast<A>(eps));
            T* out = y + row * hidden;
            for (int64_t i = 0; i < hidden; ++i)
                out[i] = static_cast<T>((h[i] - mu) * rs * static_cast<A>(weight[i]) + static_cast<A>(bias[i]));
            mean[row] = mu;
            rstd[row] = rs;
        }
    });
}

// dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, row by row.
template <typename T, typename Input>
void normalize_rows_backward(const Input& input, const T* dy, const T* weight, const Acc<T>* mean,
                             const Acc<T>* rstd, T* dh, int64_t rows, int64_t hidden) {
    using A = Acc<T>;
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        std::vector<A> xhat(hidden), g(hidden);
        for (int64_t row = begin; row < end; ++row) {
            input(row, 0, hidden, xhat.data());
            const A mu = mean[row], rs = rstd[row];
            const T* dy_row = dy + row * hidden;
            A sum_g = 0, sum_g_xhat = 0;
            for (int64_t i = 0; i < hidden; ++i) {
                xhat[i] = (xhat[i] - mu) * rs;
                g[i] = static_cast<A>(dy_row[i]) * static_cast<A>(weight[i]);
                sum_g += g[i];
                sum_g_xhat += g[i] * xhat[i];
            }
            const A mean_g = sum_g / static_cast<A>(hidden);
            const A mean_g_xhat = sum_g_xhat / static_cast<A>(hidden);
            T* out = dh + row * hidden;
            for (int64_t i = 0; i < hidden; ++i) out[i] = static_cast<T>(rs * (g[i] - mean_g - xhat[i] * mean_g_xhat));
        }
    });
}

// dweight = sum_rows(dy * xhat), dbias = sum_rows(dy), dlinear_bias = sum_rows(dh) if wanted.
template <typename T, typename Input>
void normalize_params_backward(const Input& input, const T* dy, const T* dh, const Acc<T>* mean, const Acc<T>* rstd,
                               T* dweight, T* dbias, T* dlinear_bias, int64_t rows, int64_t hidden) {
    using A = Acc<T>;
    at::parallel_for(0, column_blocks(hidden), 1, [&](int64_t block_begin, int64_t block_end) {
        A h[kColumnBlock], acc_dweight[kColumnBlock], acc_dbias[kColumnBlock], acc_dh[kColumnBlock];
        for (int64_t block = block_begin; block < block_end; ++block) {
            const int64_t col0 = block * kColumnBlock;
            const int64_t n = std::min(kColumnBlock, hidden - col0);
            std::fill_n(acc_dweight, n, A(0));
            std::fill_n(acc_dbias, n, A(0));
            std::fill_n(acc_dh, n, A(0));
            for (int64_t row = 0; row < rows; ++row) {
                input(row, col0, n, h);
                const A mu = mean[row], rs = rstd[row];
                const T* dy_row = dy + row * hidden + col0;
                for (int64_t i = 0; i < n; ++i) {
                    const A d = static_cast<A>(dy_row[i]);
                    acc_dweight[i] += d * (h[i] - mu) * rs;
                    acc_dbias[i] += d;
                }
                if (dlinear_bias != nullptr) {
                    const T* dh_row = dh + row * hidden + col0;
                    for (int64_t i = 0; i < n; ++i) acc_dh[i] += static_cast<A>(dh_row[i]);
                }
            }
            for (int64_t i = 0; i < n; ++i) {
                dweight[col0 + i] = static_cast<T>(acc_dweight[i]);
                dbias[col0 + i] = static_cast<T>(acc_dbias[i]);
                if (dlinear_bias != nullptr) dlinear_bias[col0 + i] = static_cast<T>(acc_dh[i]);
            }
        }
    });
}

template <typename A>
A gelu(A z) {
    return A(0.5) * z * (A(1) + std::erf(z * A(0.70710678118654752440)));
}

template <typename A>
A gelu_grad(A z) {
    return A(0.5) * (A(1) + std::erf(z * A(0.70710678118654752440))) +
           z * A(0.39894228040143267794) * std::exp(A(-0.5) * z * z);
}

}  // namespace

template <typename T>
void layer_norm_forward(const T* x, const T* residual, const T* linear_bias, const T* weight, const T* bias, T* y,
                        Acc<T>* mean, Acc<T>* rstd, int64_t rows, int64_t hidden, double eps) {
    normalize_rows(ResidualInput<T>{x, residual, linear_bias, hidden}, weight, bias, y, mean, rstd, rows, hidden, eps);
}

template <typename T>
void layer_norm_backward(const T* dy, const T* x, const T* residual, const T* linear_bias, const T* weight,
                         const Acc<T>* mean, const Acc<T>* rstd, T* dx, T* dweight, T* dbias, T* dlinear_bias,
                         int64_t rows, int64_t hidden) {
    const ResidualInput<T> input{x, residual, linear_bias, hidden};
    normalize_rows_backward(input, dy, weight, mean, rstd, dx, rows, hidden);
    normalize_params_backward(input, dy, dx, mean, rstd, dweight, dbias, dlinear_bias, rows, hidden);
}

template <typename T>
void embedding_layer_norm_forward(const EmbeddingTables& tables, const T* weight, const T* bias, T* y, Acc<T>* mean,
                                  Acc<T>* rstd, int64_t rows, int64_t hidden, double eps) {
    normalize_rows(EmbeddingInput<T>{tables, hidden}, weight, bias, y, mean, rstd, rows, hidden, eps);
}

template <typename T>
void embedding_layer_norm_backward(const T* dy, const EmbeddingTables& tables, const T* weight, const Acc<T>* mean,
                                   const Acc<T>* rstd, T* dsum, T* dweight, T* dbias, int64_t rows, int64_t hidden) {
    const EmbeddingInput<T> input{tables, hidden};
    normalize_rows_backward(input, dy, weight, mean, rstd, dsum, rows, hidden);
    normalize_params_backward<T>(input, dy, nullptr, mean, rstd, dweight, dbias, nullptr, rows, hidden);
}

template <typename T>
void bias_gelu_forward(const T* x, const T* bias, T* y, int64_t rows, int64_t hidden) {
    using A = Acc<T>;
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const T* in = x + row * hidden;
            T* out = y + row * hidden;
            for (int64_t i = 0; i < hidden; ++i)
                out[i] = static_cast<T>(gelu(static_cast<A>(in[i]) + static_cast<A>(bias[i])));
        }
    });
}

// One pass over column blocks: each block writes its dx columns and sums them for dbias.
template <typename T>
void bias_gelu_backward(const T* dy, const T* x, const T* bias, T* dx, T* dbias, int64_t rows, int64_t hidden) {
    using A = Acc<T>;
    at::parallel_for(0, column_blocks(hidden), 1, [&](int64_t block_begin, int64_t block_end) {
        A acc[kColumnBlock], b[kColumnBlock];
        for (int64_t block = block_begin; block < block_end; ++block) {
            const int64_t col0 = block * kColumnBlock;
            const int64_t n = std::min(kColumnBlock, hidden - col0);
            for (int64_t i = 0; i < n; ++i) {
                acc[i] = 0;
                b[i] = static_cast<A>(bias[col0 + i]);
            }
            for (int64_t row = 0; row < rows; ++row) {
                const int64_t offset = row * hidden + col0;
                for (int64_t i = 0; i < n; ++i) {
                    const A d = static_cast<A>(dy[offset + i]) * gelu_grad(static_cast<A>(x[offset + i]) + b[i]);
                    dx[offset + i] = static_cast<T>(d);
                    acc[i] += d;
                }
            }
            for (int64_t i = 0; i < n; ++i) dbias[col0 + i] = static_cast<T>(acc[i]);
        }
    });
}

// p[0:seq_k] = softmax(scores * scale) over the kept keys, in A; all zeros when every key is masked.
template <typename A>
void softmax_row(const A* scores, const uint8_t* keep, int64_t seq_k, A scale, A* p) {
    const A neg_inf = -std::numeric_limits<A>::infinity();
    A row_max = neg_inf;
    for (int64_t j = 0; j < seq_k; ++j) {
        p[j] = (keep == nullptr || keep[j] != 0) ? scores[j] * scale : neg_inf;
        row_max = std::max(row_max, p[j]);
    }
    if (row_max == neg_inf) {  // every key masked: a zero row, not NaN
        std::fill_n(p, seq_k, A(0));
        return;
    }
    A sum = 0;
    for (int64_t j = 0; j < seq_k; ++j) {
        p[j] = std::exp(p[j] - row_max);  // exp(-inf) = 0 for masked keys
        sum += p[j];
    }
    const A inv_sum = A(1) / sum;
    for (int64_t j = 0; j < seq_k; ++j) p[j] *= inv_sum;
}

template <typename T>
void masked_softmax_forward(const Acc<T>* scores, const uint8_t* mask, T* probs, int64_t batch,
                            int64_t rows_per_batch, int64_t seq_k, double scale) {
    using A = Acc<T>;
    at::parallel_for(0, batch * rows_per_batch, grain_rows(seq_k), [&](int64_t begin, int64_t end) {
        std::vector<A> p(seq_k);
        for (int64_t row = begin; row < end; ++row) {
            const uint8_t* keep = mask != nullptr ? mask + (row / rows_per_batch) * seq_k : nullptr;
            softmax_row<A>(scores + row * seq_k, keep, seq_k, static_cast<A>(scale), p.data());
            T* out = probs + row * seq_k;
            for (int64_t j = 0; j < seq_k; ++j) out[j] = static_cast<T>(p[j]);
        }
    });
}

// The probabilities are recomputed in A from the scores: rounded to T they would lose the 1 - p
// of a dominant key, which every key's gradient depends on.
template <typename T>
void masked_softmax_backward(const T* dprobs, const Acc<T>* scores, const uint8_t* mask, Acc<T>* dscores,
                             int64_t batch, int64_t rows_per_batch, int64_t seq_k, double scale) {
    using A = Acc<T>;
    at::parallel_for(0, batch * rows_per_batch, grain_rows(seq_k), [&](int64_t begin, int64_t end) {
        std::vector<A> p(seq_k);
        for (int64_t row = begin; row < end; ++row) {
            const uint8_t* keep = mask != nullptr ? mask + (row / rows_per_batch) * seq_k : nullptr;
            softmax_row<A>(scores + row * seq_k, keep, seq_k, static_cast<A>(scale), p.data());
            const T* dp = dprobs + row * seq_k;
            A* out = dscores + row * seq_k;
            A dot = 0;
            for (int64_t j = 0; j < seq_k; ++j) dot += static_cast<A>(dp[j]) * p[j];
            for (int64_t j = 0; j < seq_k; ++j) out[j] = static_cast<A>(scale) * p[j] * (static_cast<A>(dp[j]) - dot);
        }
    });
}

#define BERTFAST_INSTANTIATE(T)                                                                                      \
    template void layer_norm_forward<T>(const T*, const T*, const T*, const T*, const T*, T*, Acc<T>*, Acc<T>*,      \
                                        int64_t, int64_t, double);                                                   \
    template void layer_norm_backward<T>(const T*, const T*, const T*, const T*, const T*, const Acc<T>*,            \
                                         const Acc<T>*, T*, T*, T*, T*, int64_t, int64_t);                           \
    template void embedding_layer_norm_forward<T>(const EmbeddingTables&, const T*, const T*, T*, Acc<T>*, Acc<T>*,  \
                                                  int64_t, int64_t, double);                                         \
    template void embedding_layer_norm_backward<T>(const T*, const EmbeddingTables&, const T*, const Acc<T>*,        \
                                                   const Acc<T>*, T*, T*, T*, int64_t, int64_t);                     \
    template void bias_gelu_forward<T>(const T*, const T*, T*, int64_t, int64_t);                                    \
    template void bias_gelu_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t);                     \
    template void masked_softmax_forward<T>(const Acc<T>*, const uint8_t*, T*, int64_t, int64_t, int64_t, double);   \
    template void masked_softmax_backward<T>(const T*, const Acc<T>*, const uint8_t*, Acc<T>*, int64_t, int64_t,     \
                                             int64_t, double);

BERTFAST_INSTANTIATE(float)
BERTFAST_INSTANTIATE(double)
BERTFAST_INSTANTIATE(c10::Half)
BERTFAST_INSTANTIATE(c10::BFloat16)

#undef BERTFAST_INSTANTIATE

}  // namespace cpu
}  // namespace bertfast
