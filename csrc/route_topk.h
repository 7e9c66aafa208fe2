// route_topk CUDA launchers: plain C++ signatures (raw pointers, sizes, an opaque cudaStream_t) so that the
// torch-side binding in route_topk.cpp needs no CUDA header and route_topk_cuda.cu needs no torch header.
#pragma once

#include <cstdint>

#include "common.h"

namespace medcare {

// logits [T, E] (dt) -> gates [T, E] (fp32, fp64 for fp64 logits), indices [T, K] int64, stats [T, 2] (max, sum
// of exp) in the gates' dtype: everything the backward needs besides the logits themselves.
void route_topk_fwd_cuda(DType dt, const void* logits, int64_t tokens, int experts, int top_k, void* gates,
                         int64_t* indices, void* stats, void* stream);

// d_gates [T, E] (gates' dtype), logits [T, E] (dt), indices [T, K], stats [T, 2] -> d_logits [T, E] (dt).
void route_topk_bwd_cuda(DType dt, const void* d_gates, const void* logits, const int64_t* indices,
                         const void* stats, int64_t tokens, int experts, int top_k, void* d_logits, void* stream);

}  // namespace medcare
