// Torch-side helpers for the op files (*.cpp): dtype mapping, argument checks and the current CUDA stream.
// Only ATen/c10 core headers, no CUDA header: the stream comes through c10's device-generic guard interface,
// so the CUDA bindings also compile against a CPU-only torch (the CMake compile check on CI).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "common.h"

namespace medcare {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_VALUE(false, "medcare: unsupported dtype ", t, " (float16, bfloat16, float32, float64)");
  }
}

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Router / penalty accumulation: fp32, fp64 for fp64 inputs (medcare_kernels.reference.router_dtype).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The current stream of `device` as a cudaStream_t, for the pure-CUDA launchers.
inline void* current_stream(const c10::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
  return impl->getStream(device).native_handle();
}

}  // namespace medcare
