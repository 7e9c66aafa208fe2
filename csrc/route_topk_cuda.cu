// route_topk on CUDA: fp32 softmax -> top-K (ties to the lower index) -> renormalise, and its backward.
//
// A token is handled by a group of L lanes of one warp (L = next power of two >= E, at most 32), each lane
// holding V = ceil(E / L) <= 2 logits in registers: E = 8 packs four tokens per warp. Every reduction (max,
// sum, the K arg-max rounds) is a butterfly of register shuffles inside the group: no shared memory, so no
// bank conflicts, and all lanes end with the same result. Loads and stores are contiguous across lanes.
// Saved for backward: indices and (max, sum-of-exp) per token; the backward recomputes p from the logits,
// which costs one re-read of [T, E] instead of keeping the [T, E] probabilities alive.
// Reference: medcare_kernels.reference.route_topk; backward formula: medcare_kernels/ops/routing_torch.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "cuda_convert.cuh"
#include "route_topk.h"

namespace medcare {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };


__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <int L, typename A> __device__ __forceinline__ A group_sum(A v) {
#pragma unroll
  for (int o = L / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o, L);
  return v;
}

template <int L, typename A> __device__ __forceinline__ A group_max(A v) {
#pragma unroll
  for (int o = L / 2; o > 0; o /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o, L));
  return v;
}

// Arg-max over the group; on equal values the lower expert index wins (the reference's tie rule).
template <int L, typename A> __device__ __forceinline__ void group_argmax(A& v, int& i) {
#pragma unroll
  for (int o = L / 2; o > 0; o /= 2) {
    A ov = __shfl_xor_sync(0xffffffffu, v, o, L);
    int oi = __shfl_xor_sync(0xffffffffu, i, o, L);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
}

// Lane `lane` of a group holds experts lane, lane + L, ...: p[j] is expert lane + j * L.
template <typename T, int L, int V>
__global__ void __launch_bounds__(kThreads) route_topk_fwd_kernel(
    const T* __restrict__ logits, int64_t tokens, int E, int K, typename Acc<T>::type* __restrict__ gates,
    int64_t* __restrict__ indices, typename Acc<T>::type* __restrict__ stats) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % L;
  const int64_t tok = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / L;
  const bool live = tok < tokens;  // dead lanes still take part in the shuffles
  A p[V];
  A m = -INFINITY;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = lane + j * L;
    p[j] = (live && e < E) ? to_acc(logits[tok * E + e]) : A(-INFINITY);
    m = fmax(m, p[j]);
  }
  m = group_max<L>(m);
  A s = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    p[j] = (live && lane + j * L < E) ? exp_acc(p[j] - m) : A(0);
    s += p[j];
  }
  s = group_sum<L>(s);
#pragma unroll
  for (int j = 0; j < V; ++j) p[j] = p[j] / s;

  unsigned taken = 0;  // bit j: this lane's expert lane + j * L is selected
  A z = 0;
  for (int k = 0; k < K; ++k) {
    A bv = -1;  // probabilities are >= 0, so -1 means "nothing left in this lane"
    int bi = E;
#pragma unroll
    for (int j = 0; j < V; ++j) {  // j ascending = expert ascending: strict > keeps the lower index
      const int e = lane + j * L;
      if (e < E && !((taken >> j) & 1u) && p[j] > bv) { bv = p[j]; bi = e; }
    }
    group_argmax<L>(bv, bi);
    if (bi >= E) bi = E - 1;  // only reachable with NaN logits; keeps every index in range
    if (bi % L == lane) taken |= 1u << (bi / L);
    z += bv;
    if (live && lane == 0) indices[tok * K + k] = bi;
  }
  if (!live) return;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = lane + j * L;
    if (e < E) gates[tok * E + e] = ((taken >> j) & 1u) ? p[j] / z : A(0);
  }
  if (lane == 0) {
    stats[2 * tok] = m;
    stats[2 * tok + 1] = s;
  }
}

// With Z = sum_{sel} p, w = p / Z: dp = (dw - sum_sel dw w) / Z on the selected experts, 0 elsewhere;
// dl = p (dp - sum_e p_e dp_e).
template <typename T, int L, int V>
__global__ void __launch_bounds__(kThreads) route_topk_bwd_kernel(
    const typename Acc<T>::type* __restrict__ d_gates, const T* __restrict__ logits,
    const int64_t* __restrict__ indices, const typename Acc<T>::type* __restrict__ stats, int64_t tokens, int E,
    int K, T* __restrict__ d_logits) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % L;
  const int64_t tok = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / L;
  const bool live = tok < tokens;
  const A m = live ? stats[2 * tok] : A(0);
  const A s = live ? stats[2 * tok + 1] : A(1);
  unsigned sel = 0;
  if (live) {
    for (int k = 0; k < K; ++k) {
      const int64_t e = indices[tok * K + k];
      if (e % L == lane) sel |= 1u << (e / L);
    }
  }
  A p[V], dg[V];
  A z = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = lane + j * L;
    const bool in = live && e < E;
    p[j] = in ? exp_acc(to_acc(logits[tok * E + e]) - m) / s : A(0);
    dg[j] = in ? d_gates[tok * E + e] : A(0);
    if ((sel >> j) & 1u) z += p[j];
  }
  z = group_sum<L>(z);
  A s1 = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) if ((sel >> j) & 1u) s1 += dg[j] * (p[j] / z);
  s1 = group_sum<L>(s1);
  A dp[V];
  A s2 = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    dp[j] = ((sel >> j) & 1u) ? (dg[j] - s1) / z : A(0);
    s2 += p[j] * dp[j];
  }
  s2 = group_sum<L>(s2);
  if (!live) return;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int e = lane + j * L;
    if (e < E) d_logits[tok * E + e] = from_acc<T>(p[j] * (dp[j] - s2));
  }
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::fprintf(stderr, "medcare: %s launch failed: %s\n", what, cudaGetErrorString(err));
    std::abort();  // an unlaunched kernel would return garbage silently; the binding validated the shapes
  }
}

int lanes_for(int E) {
  int lanes = 1;
  while (lanes < E && lanes < 32) lanes *= 2;
  return lanes;
}

template <typename T, int L, int V>
void fwd_launch(const void* logits, int64_t tokens, int E, int K, void* gates, int64_t* indices, void* stats,
                cudaStream_t st) {
  using A = typename Acc<T>::type;
  const int64_t blocks = ceil_div(tokens * L, kThreads);
  route_topk_fwd_kernel<T, L, V><<<blocks, kThreads, 0, st>>>(static_cast<const T*>(logits), tokens, E, K,
                                                                 static_cast<A*>(gates), indices,
                                                                 static_cast<A*>(stats));
  check_launch("route_topk forward");
}

template <typename T, int L, int V>
void bwd_launch(const void* d_gates, const void* logits, const int64_t* indices, const void* stats, int64_t tokens,
                int E, int K, void* d_logits, cudaStream_t st) {
  using A = typename Acc<T>::type;
  const int64_t blocks = ceil_div(tokens * L, kThreads);
  route_topk_bwd_kernel<T, L, V><<<blocks, kThreads, 0, st>>>(
      static_cast<const A*>(d_gates), static_cast<const T*>(logits), indices, static_cast<const A*>(stats), tokens,
      E, K, static_cast<T*>(d_logits));
  check_launch("route_topk backward");
}

// The smallest lane group that covers E experts: L = next power of two (<= 32), V = 2 values per lane above 32.
#define MEDCARE_WITH_GROUP(E, FN, T, ...)                                \
  switch (E > 32 ? 64 : lanes_for(E)) {                                  \
    case 1: FN<T, 1, 1>(__VA_ARGS__); break;                             \
    case 2: FN<T, 2, 1>(__VA_ARGS__); break;                             \
    case 4: FN<T, 4, 1>(__VA_ARGS__); break;                             \
    case 8: FN<T, 8, 1>(__VA_ARGS__); break;                             \
    case 16: FN<T, 16, 1>(__VA_ARGS__); break;                           \
    case 32: FN<T, 32, 1>(__VA_ARGS__); break;                           \
    default: FN<T, 32, 2>(__VA_ARGS__); break;                           \
  }

template <typename T>
void fwd_typed(const void* logits, int64_t tokens, int E, int K, void* gates, int64_t* indices, void* stats,
               cudaStream_t st) {
  MEDCARE_WITH_GROUP(E, fwd_launch, T, logits, tokens, E, K, gates, indices, stats, st)
}

template <typename T>
void bwd_typed(const void* d_gates, const void* logits, const int64_t* indices, const void* stats, int64_t tokens,
               int E, int K, void* d_logits, cudaStream_t st) {
  MEDCARE_WITH_GROUP(E, bwd_launch, T, d_gates, logits, indices, stats, tokens, E, K, d_logits, st)
}

}  // namespace

void route_topk_fwd_cuda(DType dt, const void* logits, int64_t tokens, int experts, int top_k, void* gates,
                         int64_t* indices, void* stats, void* stream) {
  if (tokens == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: fwd_typed<float>(logits, tokens, experts, top_k, gates, indices, stats, st); break;
    case DType::kFloat16: fwd_typed<__half>(logits, tokens, experts, top_k, gates, indices, stats, st); break;
    case DType::kBFloat16: fwd_typed<__nv_bfloat16>(logits, tokens, experts, top_k, gates, indices, stats, st); break;
    case DType::kFloat64: fwd_typed<double>(logits, tokens, experts, top_k, gates, indices, stats, st); break;
  }
}

void route_topk_bwd_cuda(DType dt, const void* d_gates, const void* logits, const int64_t* indices,
                         const void* stats, int64_t tokens, int experts, int top_k, void* d_logits, void* stream) {
  if (tokens == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32:
      bwd_typed<float>(d_gates, logits, indices, stats, tokens, experts, top_k, d_logits, st); break;
    case DType::kFloat16:
      bwd_typed<__half>(d_gates, logits, indices, stats, tokens, experts, top_k, d_logits, st); break;
    case DType::kBFloat16:
      bwd_typed<__nv_bfloat16>(d_gates, logits, indices, stats, tokens, experts, top_k, d_logits, st); break;
    case DType::kFloat64:
      bwd_typed<double>(d_gates, logits, indices, stats, tokens, experts, top_k, d_logits, st); break;
  }
}

}  // namespace medcare
