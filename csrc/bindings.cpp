// bertfast._C: the Python binding of the C++/CUDA kernels.
//
// The only translation unit that includes torch's headers (CPU headers only: the CUDA
// kernels are reached through the plain launcher API of cuda/launchers.h).  Every function
// runs in the same order:
//
//   1. check every argument -- device, dtype, contiguity, shape, the CUDA kernels' row
//      limit, the CPU kernels' id ranges -- with a message that names it, holding the GIL
//      and before anything else happens (no device guard, no allocation, no CUDA call yet);
//   2. select the device, allocate the outputs (still holding the GIL);
//   3. run the CPU kernels, or enqueue the CUDA kernels on the stream given as an integer
//      (torch.cuda.current_stream().cuda_stream), with the GIL released (without_gil), and
//      turn a CUDA status into an error once the GIL is held again.
//
// No function is bound with a gil_scoped_release call guard: an exception is only ever
// thrown, and translated into a Python exception, while the GIL is held.
// tests/test_cuda_sources.py (test_binding_*) checks this order in this file.
// Inputs must already be contiguous: the Python side (bertfast.ops.ext_backend) decides
// when a copy is worth it.

#include <c10/core/DeviceGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cpu/kernels.h"

#if __has_include("bertfast_build_info.h")
#include "bertfast_build_info.h"  // written by setup.py: BERTFAST_WITH_CUDA, archs, torch version
#endif
#ifdef BERTFAST_WITH_CUDA
#include "cuda/launchers.h"
#endif
#ifndef BERTFAST_CUDA_ARCHS
#define BERTFAST_CUDA_ARCHS ""
#endif
#ifndef BERTFAST_BUILD_TORCH_VERSION
#define BERTFAST_BUILD_TORCH_VERSION "unknown"
#endif

namespace {

using at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

// ---------------------------------------------------------------------------------------------
// Argument checks (each message starts with the function and names the argument)
// ---------------------------------------------------------------------------------------------

bool cuda_dtype_ok(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
bool cpu_dtype_ok(at::ScalarType t) { return cuda_dtype_ok(t) || t == at::kDouble; }

// The accumulation dtype of `t`: fp64 for fp64, fp32 otherwise.  LayerNorm statistics and the softmax's scores
// (and their gradient) are kept in it.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
at::ScalarType stats_dtype(const Tensor& x) { return acc_dtype(x.scalar_type()); }

void check_contiguous(const char* fn, const char* name, const Tensor& t) {
    TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got shape ", t.sizes(), " with strides ",
                t.strides());
}

void check_shape(const char* fn, const char* name, const Tensor& t, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The tensor that fixes the call's device and dtype.
void check_primary(const char* fn, const char* name, const Tensor& t) {
    if (t.is_cuda()) {
#ifndef BERTFAST_WITH_CUDA
        TORCH_CHECK(false, fn, ": ", name, " is on ", t.device(),
                    " but bertfast._C was built without CUDA kernels; rebuild it where torch has CUDA and nvcc is "
                    "found (BERTFAST_CUDA=1 pip install -e . --no-build-isolation)");
#endif
        TORCH_CHECK(cuda_dtype_ok(t.scalar_type()), fn, ": ", name, " has dtype ", t.scalar_type(),
                    "; the CUDA kernels take float32, float16 or bfloat16");
    } else {
        TORCH_CHECK(t.is_cpu(), fn, ": ", name, " must be a CPU or CUDA tensor, got ", t.device());
        TORCH_CHECK(cpu_dtype_ok(t.scalar_type()), fn, ": ", name, " has dtype ", t.scalar_type(),
                    "; the CPU kernels take float64, float32, float16 or bfloat16");
    }
    check_contiguous(fn, name, t);
}

// Same device and dtype as `ref`, contiguous.
void check_like(const char* fn, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
    TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on ", ref_name, "'s device ", ref.device(),
                ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have ", ref_name, "'s dtype ",
                ref.scalar_type(), ", got ", t.scalar_type());
    check_contiguous(fn, name, t);
}

void check_stats(const char* fn, const char* name, const Tensor& t, const Tensor& x, at::IntArrayRef shape) {
    const at::ScalarType want = stats_dtype(x);
    TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " must be on ", x.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == want, fn, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
    check_contiguous(fn, name, t);
    check_shape(fn, name, t, shape);
}

// int64 ids shaped like input_ids, on the tables' device.
void check_ids(const char* fn, const char* name, const Tensor& t, const Tensor& input_ids, const Tensor& table) {
    TORCH_CHECK(t.scalar_type() == at::kLong, fn, ": ", name, " must have dtype int64 (torch.long), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == table.device(), fn, ": ", name, " must be on the tables' device ", table.device(),
                ", got ", t.device());
    check_contiguous(fn, name, t);
    check_shape(fn, name, t, input_ids.sizes());
}

// On the CPU an out-of-range id is an error (the CUDA kernels turn its row into NaN instead).
void check_id_range(const char* fn, const char* name, const Tensor& ids, int64_t limit) {
    if (!ids.is_cpu()) return;
    const int64_t* p = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i)
        TORCH_CHECK(p[i] >= 0 && p[i] < limit, fn, ": ", name, " holds ", p[i], " at flat index ", i,
                    ", outside the table's rows [0, ", limit, ")");
}

template <typename T>
const T* ptr_or_null(const OptionalTensor& t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

at::IntArrayRef leading_dims(const Tensor& x) { return x.sizes().slice(0, x.dim() - 1); }

// The CUDA row kernels keep a row (LayerNorm hidden size, softmax key length) in shared
// memory: refuse a longer one while checking arguments, before any CUDA work.  Without the
// CUDA kernels check_primary has already refused CUDA tensors.
void check_cuda_row(const char* fn, const char* what, int64_t length, const Tensor& primary) {
#ifdef BERTFAST_WITH_CUDA
    if (primary.is_cuda())
        TORCH_CHECK(length <= bertfast::cuda::kMaxRowElements, fn, ": ", what, " is ", length,
                    "; the CUDA kernels take at most ", bertfast::cuda::kMaxRowElements);
#else
    (void)fn, (void)what, (void)length, (void)primary;
#endif
}

// The CUDA elementwise kernels index a row with a 32-bit int.
void check_cuda_int_dim(const char* fn, const char* what, int64_t length, const Tensor& primary) {
    if (primary.is_cuda())
        TORCH_CHECK(length <= INT32_MAX, fn, ": ", what, " is ", length, "; the CUDA kernels take at most ",
                    INT32_MAX);
}

// Runs `work` (a kernel call that checks nothing) with the GIL released.  Should it throw
// anyway, the exception is captured and rethrown once the GIL is held again, so that it
// never unwinds through, or is translated into a Python exception in, a thread state that
// does not hold the GIL.
template <typename Work>
void without_gil(Work&& work) {
    std::exception_ptr error;
    {
        py::gil_scoped_release release;
        try {
            std::forward<Work>(work)();
        } catch (...) {
            error = std::current_exception();
        }
    }
    if (error) std::rethrow_exception(error);
}

#ifdef BERTFAST_WITH_CUDA
namespace cu = bertfast::cuda;

const void* raw_or_null(const OptionalTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

cu::DType cuda_dtype(const Tensor& t) {
    switch (t.scalar_type()) {
        case at::kHalf:
            return cu::DType::Float16;
        case at::kBFloat16:
            return cu::DType::BFloat16;
        default:
            return cu::DType::Float32;
    }
}

void check_cuda_status(const char* fn, int code) {
    TORCH_CHECK(code == 0, fn, ": CUDA error: ", cu::cuda_error_string(code));
}

// Selects t's device in the extension's own CUDA runtime (c10::DeviceGuard sets torch's).
void use_device_of(const char* fn, const Tensor& t) { check_cuda_status(fn, cu::use_device(t.get_device())); }


void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

Tensor cuda_workspace(const Tensor& like, int64_t floats) {
    return at::empty({floats > 0 ? floats : 1}, like.options().dtype(at::kFloat));
}
#endif

#define BERTFAST_DISPATCH_CPU(TYPE, NAME, ...) \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// LayerNorm(x + linear_bias + residual)
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                      const OptionalTensor& residual,
                                                      const OptionalTensor& linear_bias, double eps, int64_t stream) {
    constexpr const char* fn = "bertfast._C.layer_norm_forward";
    check_primary(fn, "x", x);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, fn, ": x must have a non-empty last dimension, got shape ",
                x.sizes());
    const int64_t hidden = x.size(-1);
    check_like(fn, "weight", weight, "x", x);
    check_shape(fn, "weight", weight, {hidden});
    check_like(fn, "bias", bias, "x", x);
    check_shape(fn, "bias", bias, {hidden});
    if (residual.has_value()) {
        check_like(fn, "residual", *residual, "x", x);
        check_shape(fn, "residual", *residual, x.sizes());
    }
    if (linear_bias.has_value()) {
        check_like(fn, "linear_bias", *linear_bias, "x", x);
        check_shape(fn, "linear_bias", *linear_bias, {hidden});
    }
    TORCH_CHECK(eps > 0, fn, ": eps must be positive, got ", eps);
    check_cuda_row(fn, "x's last dimension (hidden)", hidden, x);

    const c10::DeviceGuard guard(x.device());
    Tensor y = at::empty(x.sizes(), x.options());
    Tensor mean = at::empty(leading_dims(x), x.options().dtype(stats_dtype(x)));
    Tensor rstd = at::empty(leading_dims(x), x.options().dtype(stats_dtype(x)));
    const int64_t rows = x.numel() / hidden;
    if (x.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        use_device_of(fn, x);
        int status = 0;
        without_gil([&] {
            status = cu::layer_norm_forward(cuda_dtype(x), x.data_ptr(), raw_or_null(residual),
                                            raw_or_null(linear_bias), weight.data_ptr(), bias.data_ptr(),
                                            y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
                                            hidden, static_cast<float>(eps), as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return {y, mean, rstd};
    }
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(x.scalar_type(), fn, [&] {
            using A = bertfast::cpu::Acc<scalar_t>;
            bertfast::cpu::layer_norm_forward<scalar_t>(
                x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual), ptr_or_null<scalar_t>(linear_bias),
                weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                rstd.data_ptr<A>(), rows, hidden, eps);
        });
    });
    return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, OptionalTensor> layer_norm_backward(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const OptionalTensor& residual,
    const OptionalTensor& linear_bias, const Tensor& mean, const Tensor& rstd, int64_t stream) {
    constexpr const char* fn = "bertfast._C.layer_norm_backward";
    check_primary(fn, "x", x);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, fn, ": x must have a non-empty last dimension, got shape ",
                x.sizes());
    const int64_t hidden = x.size(-1);
    check_like(fn, "dy", dy, "x", x);
    check_shape(fn, "dy", dy, x.sizes());
    check_like(fn, "weight", weight, "x", x);
    check_shape(fn, "weight", weight, {hidden});
    if (residual.has_value()) {
        check_like(fn, "residual", *residual, "x", x);
        check_shape(fn, "residual", *residual, x.sizes());
    }
    if (linear_bias.has_value()) {
        check_like(fn, "linear_bias", *linear_bias, "x", x);
        check_shape(fn, "linear_bias", *linear_bias, {hidden});
    }
    check_stats(fn, "mean", mean, x, leading_dims(x));
    check_stats(fn, "rstd", rstd, x, leading_dims(x));
    check_cuda_row(fn, "x's last dimension (hidden)", hidden, x);

    const c10::DeviceGuard guard(x.device());
    const int64_t rows = x.numel() / hidden;
    Tensor dx = at::empty(x.sizes(), x.options());
    Tensor dweight = rows == 0 ? at::zeros({hidden}, x.options()) : at::empty({hidden}, x.options());
    Tensor dbias = rows == 0 ? at::zeros({hidden}, x.options()) : at::empty({hidden}, x.options());
    OptionalTensor dlinear_bias;
    if (linear_bias.has_value())
        dlinear_bias = rows == 0 ? at::zeros({hidden}, x.options()) : at::empty({hidden}, x.options());
    if (x.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        Tensor workspace = cuda_workspace(x, cu::layer_norm_backward_workspace_floats(rows, hidden));
        void* dlinear_bias_ptr = dlinear_bias.has_value() ? dlinear_bias->data_ptr() : nullptr;
        use_device_of(fn, x);
        int status = 0;
        without_gil([&] {
            status = cu::layer_norm_backward(cuda_dtype(x), dy.data_ptr(), x.data_ptr(), raw_or_null(residual),
                                             raw_or_null(linear_bias), weight.data_ptr(), mean.data_ptr<float>(),
                                             rstd.data_ptr<float>(), dx.data_ptr(), dweight.data_ptr(),
                                             dbias.data_ptr(), dlinear_bias_ptr, workspace.data_ptr<float>(), rows,
                                             hidden, as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return {dx, dweight, dbias, dlinear_bias};
    }
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(x.scalar_type(), fn, [&] {
            using A = bertfast::cpu::Acc<scalar_t>;
            bertfast::cpu::layer_norm_backward<scalar_t>(
                dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual),
                ptr_or_null<scalar_t>(linear_bias), weight.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                rstd.data_ptr<A>(), dx.data_ptr<scalar_t>(), dweight.data_ptr<scalar_t>(),
                dbias.data_ptr<scalar_t>(), dlinear_bias.has_value() ? dlinear_bias->data_ptr<scalar_t>() : nullptr,
                rows, hidden);
        });
    });
    return {dx, dweight, dbias, dlinear_bias};
}

// ---------------------------------------------------------------------------------------------
// LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids])
// ---------------------------------------------------------------------------------------------

struct EmbeddingArgs {
    const Tensor& input_ids;
    const Tensor& position_ids;
    const Tensor& token_type_ids;
    const Tensor& word;
    const Tensor& position;
    const Tensor& token_type;
};

// Checks the ids and tables; returns hidden.
int64_t check_embedding_args(const char* fn, const EmbeddingArgs& a) {
    check_primary(fn, "word_embeddings", a.word);
    TORCH_CHECK(a.word.dim() == 2 && a.word.size(1) >= 1, fn,
                ": word_embeddings must have shape (vocab, hidden) with hidden >= 1, got ", a.word.sizes());
    const int64_t hidden = a.word.size(1);
    check_like(fn, "position_embeddings", a.position, "word_embeddings", a.word);
    TORCH_CHECK(a.position.dim() == 2 && a.position.size(1) == hidden, fn,
                ": position_embeddings must have shape (positions, ", hidden, "), got ", a.position.sizes());
    check_like(fn, "token_type_embeddings", a.token_type, "word_embeddings", a.word);
    TORCH_CHECK(a.token_type.dim() == 2 && a.token_type.size(1) == hidden, fn,
                ": token_type_embeddings must have shape (types, ", hidden, "), got ", a.token_type.sizes());
    check_ids(fn, "input_ids", a.input_ids, a.input_ids, a.word);
    check_ids(fn, "position_ids", a.position_ids, a.input_ids, a.word);
    check_ids(fn, "token_type_ids", a.token_type_ids, a.input_ids, a.word);
    check_cuda_row(fn, "the embedding width (hidden)", hidden, a.word);
    // On the CPU an id outside its table is an error; the CUDA kernels turn its row into NaN.
    check_id_range(fn, "input_ids", a.input_ids, a.word.size(0));
    check_id_range(fn, "position_ids", a.position_ids, a.position.size(0));
    check_id_range(fn, "token_type_ids", a.token_type_ids, a.token_type.size(0));
    return hidden;
}

std::vector<int64_t> output_shape(const Tensor& ids, int64_t hidden) {
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(hidden);
    return shape;
}

std::tuple<Tensor, Tensor, Tensor> embedding_layer_norm_forward(const Tensor& input_ids, const Tensor& position_ids,
                                                                const Tensor& token_type_ids, const Tensor& word,
                                                                const Tensor& position, const Tensor& token_type,
                                                                const Tensor& weight, const Tensor& bias, double eps,
                                                                int64_t stream) {
    constexpr const char* fn = "bertfast._C.embedding_layer_norm_forward";
    const EmbeddingArgs args{input_ids, position_ids, token_type_ids, word, position, token_type};
    const int64_t hidden = check_embedding_args(fn, args);
    check_like(fn, "weight", weight, "word_embeddings", word);
    check_shape(fn, "weight", weight, {hidden});
    check_like(fn, "bias", bias, "word_embeddings", word);
    check_shape(fn, "bias", bias, {hidden});
    TORCH_CHECK(eps > 0, fn, ": eps must be positive, got ", eps);

    const c10::DeviceGuard guard(word.device());
    const int64_t rows = input_ids.numel();
    Tensor y = at::empty(output_shape(input_ids, hidden), word.options());
    Tensor mean = at::empty(input_ids.sizes(), word.options().dtype(stats_dtype(word)));
    Tensor rstd = at::empty(input_ids.sizes(), word.options().dtype(stats_dtype(word)));
    if (word.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        use_device_of(fn, word);
        const cu::EmbeddingTables tables{input_ids.data_ptr<int64_t>(),
                                         position_ids.data_ptr<int64_t>(),
                                         token_type_ids.data_ptr<int64_t>(),
                                         word.data_ptr(),
                                         position.data_ptr(),
                                         token_type.data_ptr(),
                                         word.size(0),
                                         position.size(0),
                                         token_type.size(0)};
        int status = 0;
        without_gil([&] {
            status = cu::embedding_layer_norm_forward(cuda_dtype(word), tables, weight.data_ptr(), bias.data_ptr(),
                                                      y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                                      rows, hidden, static_cast<float>(eps), as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return {y, mean, rstd};
    }
    const bertfast::cpu::EmbeddingTables tables{input_ids.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>(),
                                                token_type_ids.data_ptr<int64_t>(), word.data_ptr(),
                                                position.data_ptr(), token_type.data_ptr()};
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(word.scalar_type(), fn, [&] {
            using A = bertfast::cpu::Acc<scalar_t>;
            bertfast::cpu::embedding_layer_norm_forward<scalar_t>(tables, weight.data_ptr<scalar_t>(),
                                                                  bias.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                                  mean.data_ptr<A>(), rstd.data_ptr<A>(), rows,
                                                                  hidden, eps);
        });
    });
    return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> embedding_layer_norm_backward(
    const Tensor& dy, const Tensor& input_ids, const Tensor& position_ids, const Tensor& token_type_ids,
    const Tensor& word, const Tensor& position, const Tensor& token_type, const Tensor& weight, const Tensor& mean,
    const Tensor& rstd, int64_t stream) {
    constexpr const char* fn = "bertfast._C.embedding_layer_norm_backward";
    const EmbeddingArgs args{input_ids, position_ids, token_type_ids, word, position, token_type};
    const int64_t hidden = check_embedding_args(fn, args);
    const std::vector<int64_t> out_shape = output_shape(input_ids, hidden);
    check_like(fn, "dy", dy, "word_embeddings", word);
    check_shape(fn, "dy", dy, out_shape);
    check_like(fn, "weight", weight, "word_embeddings", word);
    check_shape(fn, "weight", weight, {hidden});
    check_stats(fn, "mean", mean, word, input_ids.sizes());
    check_stats(fn, "rstd", rstd, word, input_ids.sizes());

    const c10::DeviceGuard guard(word.device());
    const int64_t rows = input_ids.numel();
    Tensor dsum = at::empty(out_shape, word.options());
    Tensor dweight = rows == 0 ? at::zeros({hidden}, word.options()) : at::empty({hidden}, word.options());
    Tensor dbias = rows == 0 ? at::zeros({hidden}, word.options()) : at::empty({hidden}, word.options());
    if (word.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        use_device_of(fn, word);
        const cu::EmbeddingTables tables{input_ids.data_ptr<int64_t>(),
                                         position_ids.data_ptr<int64_t>(),
                                         token_type_ids.data_ptr<int64_t>(),
                                         word.data_ptr(),
                                         position.data_ptr(),
                                         token_type.data_ptr(),
                                         word.size(0),
                                         position.size(0),
                                         token_type.size(0)};
        Tensor workspace = cuda_workspace(word, cu::layer_norm_backward_workspace_floats(rows, hidden));
        int status = 0;
        without_gil([&] {
            status = cu::embedding_layer_norm_backward(cuda_dtype(word), dy.data_ptr(), tables, weight.data_ptr(),
                                                       mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                                       dsum.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                                                       workspace.data_ptr<float>(), rows, hidden, as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return {dsum, dweight, dbias};
    }
    const bertfast::cpu::EmbeddingTables tables{input_ids.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>(),
                                                token_type_ids.data_ptr<int64_t>(), word.data_ptr(),
                                                position.data_ptr(), token_type.data_ptr()};
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(word.scalar_type(), fn, [&] {
            using A = bertfast::cpu::Acc<scalar_t>;
            bertfast::cpu::embedding_layer_norm_backward<scalar_t>(
                dy.data_ptr<scalar_t>(), tables, weight.data_ptr<scalar_t>(), mean.data_ptr<A>(), rstd.data_ptr<A>(),
                dsum.data_ptr<scalar_t>(), dweight.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(), rows, hidden);
        });
    });
    return {dsum, dweight, dbias};
}

// ---------------------------------------------------------------------------------------------
// gelu_erf(x + bias)
// ---------------------------------------------------------------------------------------------

int64_t check_bias_gelu_args(const char* fn, const Tensor& x, const Tensor& bias) {
    check_primary(fn, "x", x);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, fn, ": x must have a non-empty last dimension, got shape ",
                x.sizes());
    const int64_t hidden = x.size(-1);
    check_like(fn, "bias", bias, "x", x);
    check_shape(fn, "bias", bias, {hidden});
    check_cuda_int_dim(fn, "x's last dimension (hidden)", hidden, x);
    return hidden;
}

Tensor bias_gelu_forward(const Tensor& x, const Tensor& bias, int64_t stream) {
    constexpr const char* fn = "bertfast._C.bias_gelu_forward";
    const int64_t hidden = check_bias_gelu_args(fn, x, bias);
    const c10::DeviceGuard guard(x.device());
    const int64_t rows = x.numel() / hidden;
    Tensor y = at::empty(x.sizes(), x.options());
    if (x.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        use_device_of(fn, x);
        int status = 0;
        without_gil([&] {
            status = cu::bias_gelu_forward(cuda_dtype(x), x.data_ptr(), bias.data_ptr(), y.data_ptr(), rows, hidden,
                                           as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return y;
    }
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(x.scalar_type(), fn, [&] {
            bertfast::cpu::bias_gelu_forward<scalar_t>(x.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                                       y.data_ptr<scalar_t>(), rows, hidden);
        });
    });
    return y;
}

std::tuple<Tensor, Tensor> bias_gelu_backward(const Tensor& dy, const Tensor& x, const Tensor& bias,
                                              int64_t stream) {
    constexpr const char* fn = "bertfast._C.bias_gelu_backward";
    const int64_t hidden = check_bias_gelu_args(fn, x, bias);
    check_like(fn, "dy", dy, "x", x);
    check_shape(fn, "dy", dy, x.sizes());
    const c10::DeviceGuard guard(x.device());
    const int64_t rows = x.numel() / hidden;
    Tensor dx = at::empty(x.sizes(), x.options());
    Tensor dbias = rows == 0 ? at::zeros({hidden}, x.options()) : at::empty({hidden}, x.options());
    if (x.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        Tensor workspace = cuda_workspace(x, cu::bias_gelu_backward_workspace_floats(rows, hidden));
        use_device_of(fn, x);
        int status = 0;
        without_gil([&] {
            status = cu::bias_gelu_backward(cuda_dtype(x), dy.data_ptr(), x.data_ptr(), bias.data_ptr(),
                                            dx.data_ptr(), dbias.data_ptr(), workspace.data_ptr<float>(), rows, hidden,
                                            as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return {dx, dbias};
    }
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(x.scalar_type(), fn, [&] {
            bertfast::cpu::bias_gelu_backward<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                        bias.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                                                        dbias.data_ptr<scalar_t>(), rows, hidden);
        });
    });
    return {dx, dbias};
}

// ---------------------------------------------------------------------------------------------
// softmax(scores * scale) with a key-padding mask
// ---------------------------------------------------------------------------------------------

// Checks the scores (in the accumulation dtype of the probabilities: fp32, fp64 for fp64),
// the probabilities' dtype (named `probs_name`) and the mask; returns seq_k.
int64_t check_softmax_args(const char* fn, const Tensor& scores, const OptionalTensor& mask, const char* probs_name,
                           at::ScalarType probs_dtype) {
    check_primary(fn, "scores", scores);
    TORCH_CHECK(scores.is_cuda() ? cuda_dtype_ok(probs_dtype) : cpu_dtype_ok(probs_dtype), fn, ": ", probs_name,
                " has dtype ", probs_dtype,
                scores.is_cuda() ? "; the CUDA kernels take float32, float16 or bfloat16"
                                 : "; the CPU kernels take float64, float32, float16 or bfloat16");
    TORCH_CHECK(scores.scalar_type() == acc_dtype(probs_dtype), fn, ": scores must have dtype ",
                acc_dtype(probs_dtype), " for ", probs_name, " of dtype ", probs_dtype, ", got ", scores.scalar_type());
    TORCH_CHECK(scores.dim() >= 2, fn, ": scores must have shape (batch, ..., seq_k), got ", scores.sizes());
    const int64_t seq_k = scores.size(-1);
    if (mask.has_value()) {
        const Tensor& m = *mask;
        TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, fn,
                    ": mask must have dtype bool or uint8, got ", m.scalar_type());
        TORCH_CHECK(m.device() == scores.device(), fn, ": mask must be on scores' device ", scores.device(), ", got ",
                    m.device());
        check_contiguous(fn, "mask", m);
        check_shape(fn, "mask", m, {scores.size(0), seq_k});
    }
    check_cuda_row(fn, "scores' last dimension (seq_k)", seq_k, scores);
    return seq_k;
}

const uint8_t* keep_or_null(const OptionalTensor& mask) {
    return mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr;
}

Tensor masked_softmax_forward(const Tensor& scores, const OptionalTensor& mask, double scale,
                              at::ScalarType probs_dtype, int64_t stream) {
    constexpr const char* fn = "bertfast._C.masked_softmax_forward";
    const int64_t seq_k = check_softmax_args(fn, scores, mask, "probs_dtype", probs_dtype);

    const c10::DeviceGuard guard(scores.device());
    Tensor probs = at::empty(scores.sizes(), scores.options().dtype(probs_dtype));
    if (scores.numel() == 0) return probs;
    const int64_t batch = scores.size(0);
    const int64_t rows_per_batch = scores.numel() / (batch * seq_k);
    if (scores.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        use_device_of(fn, scores);
        int status = 0;
        without_gil([&] {
            status = cu::masked_softmax_forward(cuda_dtype(probs), scores.data_ptr<float>(), keep_or_null(mask),
                                                probs.data_ptr(), batch, rows_per_batch, seq_k,
                                                static_cast<float>(scale), as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return probs;
    }
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(probs_dtype, fn, [&] {
            using A = bertfast::cpu::Acc<scalar_t>;
            bertfast::cpu::masked_softmax_forward<scalar_t>(scores.data_ptr<A>(), keep_or_null(mask),
                                                            probs.data_ptr<scalar_t>(), batch, rows_per_batch, seq_k,
                                                            scale);
        });
    });
    return probs;
}

Tensor masked_softmax_backward(const Tensor& dprobs, const Tensor& scores, const OptionalTensor& mask, double scale,
                               int64_t stream) {
    constexpr const char* fn = "bertfast._C.masked_softmax_backward";
    const int64_t seq_k = check_softmax_args(fn, scores, mask, "dprobs", dprobs.scalar_type());
    TORCH_CHECK(dprobs.device() == scores.device(), fn, ": dprobs must be on scores' device ", scores.device(),
                ", got ", dprobs.device());
    check_contiguous(fn, "dprobs", dprobs);
    check_shape(fn, "dprobs", dprobs, scores.sizes());

    const c10::DeviceGuard guard(scores.device());
    Tensor dscores = at::empty(scores.sizes(), scores.options());
    if (scores.numel() == 0) return dscores;
    const int64_t batch = scores.size(0);
    const int64_t rows_per_batch = scores.numel() / (batch * seq_k);
    if (scores.is_cuda()) {
#ifdef BERTFAST_WITH_CUDA
        use_device_of(fn, scores);
        int status = 0;
        without_gil([&] {
            status = cu::masked_softmax_backward(cuda_dtype(dprobs), dprobs.data_ptr(), scores.data_ptr<float>(),
                                                 keep_or_null(mask), dscores.data_ptr<float>(), batch,
                                                 rows_per_batch, seq_k, static_cast<float>(scale),
                                                 as_stream(stream));
        });
        check_cuda_status(fn, status);
#endif
        return dscores;
    }
    without_gil([&] {
        BERTFAST_DISPATCH_CPU(dprobs.scalar_type(), fn, [&] {
            using A = bertfast::cpu::Acc<scalar_t>;
            bertfast::cpu::masked_softmax_backward<scalar_t>(dprobs.data_ptr<scalar_t>(), scores.data_ptr<A>(),
                                                             keep_or_null(mask), dscores.data_ptr<A>(), batch,
                                                             rows_per_batch, seq_k, scale);
        });
    });
    return dscores;
}

// ---------------------------------------------------------------------------------------------
// Build facts
// ---------------------------------------------------------------------------------------------

bool has_cuda() {
#ifdef BERTFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
}

int64_t cuda_max_row_elements() {
#ifdef BERTFAST_WITH_CUDA
    return cu::kMaxRowElements;
#else
    return 0;
#endif
}

int cuda_runtime_version() {
#ifdef BERTFAST_WITH_CUDA
    return cu::cuda_runtime_version();
#else
    return 0;
#endif
}

int cuda_driver_version() {
#ifdef BERTFAST_WITH_CUDA
    return cu::cuda_driver_version();
#else
    return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "bertfast C++/CUDA kernels (use them through bertfast.ops with backend='ext').";
    // No call guard that releases the GIL: each function releases it itself, around the
    // kernels only, after its argument checks (see without_gil).
    constexpr int64_t kDefaultStream = 0;

    m.def("layer_norm_forward", &layer_norm_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
          py::arg("residual") = py::none(), py::arg("linear_bias") = py::none(), py::arg("eps") = 1e-12,
          py::arg("stream") = kDefaultStream,
          "LayerNorm(x + linear_bias + residual) over the last dim -> (y, mean, rstd); stats fp32 (fp64 for fp64).");
    m.def("layer_norm_backward", &layer_norm_backward, py::arg("dy"), py::arg("x"), py::arg("weight"),
          py::arg("residual"), py::arg("linear_bias"), py::arg("mean"), py::arg("rstd"),
          py::arg("stream") = kDefaultStream,
          "-> (dx, dweight, dbias, dlinear_bias or None); dx is also the residual's gradient.");
    m.def("embedding_layer_norm_forward", &embedding_layer_norm_forward, py::arg("input_ids"),
          py::arg("position_ids"), py::arg("token_type_ids"), py::arg("word_embeddings"),
          py::arg("position_embeddings"), py::arg("token_type_embeddings"), py::arg("weight"), py::arg("bias"),
          py::arg("eps") = 1e-12, py::arg("stream") = kDefaultStream,
          "LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids]) -> (y, mean, rstd); "
          "int64 ids.");
    m.def("embedding_layer_norm_backward", &embedding_layer_norm_backward, py::arg("dy"),
          py::arg("input_ids"), py::arg("position_ids"), py::arg("token_type_ids"), py::arg("word_embeddings"),
          py::arg("position_embeddings"), py::arg("token_type_embeddings"), py::arg("weight"), py::arg("mean"),
          py::arg("rstd"), py::arg("stream") = kDefaultStream,
          "-> (dsum, dweight, dbias); dsum is the gradient of the summed embeddings.");
    m.def("bias_gelu_forward", &bias_gelu_forward, py::arg("x"), py::arg("bias"),
          py::arg("stream") = kDefaultStream, "gelu_erf(x + bias), bias over the last dim.");
    m.def("bias_gelu_backward", &bias_gelu_backward, py::arg("dy"), py::arg("x"), py::arg("bias"),
          py::arg("stream") = kDefaultStream, "-> (dx, dbias).");
    m.def("masked_softmax_forward", &masked_softmax_forward, py::arg("scores"),
          py::arg("mask") = py::none(), py::arg("scale") = 1.0, py::arg("probs_dtype") = at::kFloat,
          py::arg("stream") = kDefaultStream,
          "softmax(scores * scale) over the last dim -> probs of probs_dtype; scores fp32 (fp64 for fp64 probs); "
          "mask (batch, seq_k) bool/uint8, nonzero = keep; masked keys get 0 and fully masked rows are 0.");
    m.def("masked_softmax_backward", &masked_softmax_backward, py::arg("dprobs"), py::arg("scores"),
          py::arg("mask") = py::none(), py::arg("scale") = 1.0, py::arg("stream") = kDefaultStream,
          "dscores = scale * probs * (dprobs - sum(dprobs * probs)), probs recomputed from the forward's scores "
          "and mask; dscores in the scores' dtype.");

    m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled in.");
    m.def("cuda_archs", [] { return std::string(BERTFAST_CUDA_ARCHS); },
          "The CUDA architectures the kernels were compiled for, e.g. '8.0;9.0' ('' without CUDA).");
    m.def("cuda_max_row_elements", &cuda_max_row_elements,
          "Longest LayerNorm hidden size / softmax row the CUDA kernels take (0 without CUDA).");
    m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime linked in, e.g. 13000 (0 without CUDA).");
    m.def("cuda_driver_version", &cuda_driver_version, "CUDA driver version found (0 if none or without CUDA).");
    m.def("built_with_torch", [] { return std::string(BERTFAST_BUILD_TORCH_VERSION); },
          "The torch version the extension was compiled against.");
}
