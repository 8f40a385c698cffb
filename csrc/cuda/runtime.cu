// Runtime helpers for the binding: device selection, error messages, and the versions of
// the CUDA runtime linked into the extension (statically) and of the driver (0 if none).

#include <cuda_runtime.h>

#include "launchers.h"

namespace bertfast {
namespace cuda {

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int use_device(int device) { return static_cast<int>(cudaSetDevice(device)); }

int cuda_runtime_version() {
    int version = 0;
    return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : 0;
}

int cuda_driver_version() {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

}  // namespace cuda
}  // namespace bertfast
