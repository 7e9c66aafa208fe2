// Conversions between the parameter dtypes and the accumulation type, shared by the .cu files.
// CUDA headers only: nvcc checks the files that include it without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace medcare {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest from the accumulator to the stored dtype.
template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

}  // namespace medcare
