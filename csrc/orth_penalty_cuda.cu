// orth_penalty on CUDA: L = sum_i sum |A_base_i A_orth_i^T| over every (A_base, A_orth) pair of a model in one
// launch, and its gradient in one more.
//
// Work items are (pair, chunk of din) read from a device table (orth_penalty.h), so pairs of different widths
// and ranks (<= 64) share a launch. Forward: each block computes the partial r1 x r2 product of its chunk
// through k-major shared-memory slabs (4x4 register tiles, 16-byte vector reads), writes it to a workspace; the
// last block of a pair (atomic counter) reduces the partials in chunk order, writes sign(P) and the pair's
// |P| sum; the last pair sums the pair losses in pair order. No float atomics, so the result is bitwise
// deterministic. Saved for backward: sign(P) only (r1 x r2 per pair, fp32).
// Backward: each block loads sign(P) and one chunk of A_base and A_orth and writes
//   dA_base = g sign(P) A_orth,  dA_orth = g sign(P)^T A_base  (sign(0) = 0, as torch.abs)
// in the parameters' dtype into the gradient tensors; g is read on the device, so nothing synchronises.
// Why the gradients are not produced by the forward: they are as large as the parameters, so writing them in
// the forward and rescaling them in the backward moves 2x their bytes more than this (see README).
// Reference: medcare_kernels.reference.orth_penalty.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "cuda_convert.cuh"
#include "orth_penalty.h"

namespace medcare {
namespace {

constexpr int kThreads = 256;
constexpr int kFwdK = 32;                 // din columns per forward slab
constexpr int kPad = kMaxOrthRank + 4;    // row stride of rank-indexed slabs: rows stay 16-byte aligned


__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

// Deterministic block sum (fixed shuffle tree, then warps in order); the result is valid in thread 0.
template <typename A> __device__ A block_sum(A v, A* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// Stage `rows` x KS columns [k0, k0 + KS) of a row-major [rows, din] matrix into smem, zero beyond `end`.
// k_major: dst[k][r] (the forward's P tiles read 4 rows at once); otherwise dst[r][k].
template <int KS, int STRIDE, bool k_major, typename T, typename A>
__device__ __forceinline__ void stage(A* dst, const T* __restrict__ src, int rows, int64_t din, int64_t k0,
                                      int64_t end) {
  for (int e = threadIdx.x; e < rows * KS; e += kThreads) {
    const int r = e / KS, k = e % KS;
    const int64_t col = k0 + k;
    const A v = col < end ? to_acc(src[r * din + col]) : A(0);
    dst[k_major ? k * STRIDE + r : r * STRIDE + k] = v;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) orth_fwd_kernel(const OrthPairDesc* __restrict__ pairs,
                                                            const int* __restrict__ item_pair,
                                                            unsigned* counters, int64_t n_pairs, A* partials,
                                                            A* pair_loss, A* __restrict__ signs, A* loss) {
  __shared__ __align__(16) A at[kFwdK * kPad];
  __shared__ __align__(16) A bt[kFwdK * kPad];
  __shared__ A scratch[kThreads / 32];
  __shared__ bool last;
  const int p = item_pair[blockIdx.x];
  const OrthPairDesc d = pairs[p];
  const int r1 = static_cast<int>(d.r1), r2 = static_cast<int>(d.r2);
  const int64_t chunk = blockIdx.x - d.first_item;
  const int64_t d0 = chunk * kOrthFwdChunk, d1 = min(d.din, d0 + kOrthFwdChunk);
  // Thread t owns the 4x4 tile t of P (tiles packed densely, so rank 32 keeps every lane of 2 warps busy).
  const int tc = (r2 + 3) / 4, tiles = ((r1 + 3) / 4) * tc;
  const bool owns = static_cast<int>(threadIdx.x) < tiles;
  const int r0 = owns ? (threadIdx.x / tc) * 4 : 0, c0 = owns ? (threadIdx.x % tc) * 4 : 0;
  A acc[4][4] = {};
  for (int64_t k0 = d0; k0 < d1; k0 += kFwdK) {
    stage<kFwdK, kPad, true>(at, reinterpret_cast<const T*>(d.a_base), r1, d.din, k0, d1);
    stage<kFwdK, kPad, true>(bt, reinterpret_cast<const T*>(d.a_orth), r2, d.din, k0, d1);
    __syncthreads();
    if (owns) {
#pragma unroll 8
      for (int k = 0; k < kFwdK; ++k) {
        A x[4], y[4];  // rows past r1 / r2 hold stale values; they only reach tile entries never written
        load4(at + k * kPad + r0, x);
        load4(bt + k * kPad + c0, y);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += x[i] * y[j];
      }
    }
    __syncthreads();
  }
  const int64_t rr = static_cast<int64_t>(r1) * r2;
  A* part = partials + d.partial_offset;
  if (owns)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        if (r0 + i < r1 && c0 + j < r2) part[chunk * rr + (r0 + i) * r2 + c0 + j] = acc[i][j];
  // Last block of this pair: reduce the chunk partials in chunk order (deterministic), sign and |.| sum.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[p], 1u) == static_cast<unsigned>(d.n_items - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  A local = 0;
  for (int64_t e = threadIdx.x; e < rr; e += kThreads) {
    A v = 0;
    for (int64_t c = 0; c < d.n_items; ++c) v += __ldcg(part + c * rr + e);
    signs[d.sign_offset + e] = static_cast<A>((v > A(0)) - (v < A(0)));
    local += fabs(v);
  }
  const A pair_total = block_sum(local, scratch);
  if (threadIdx.x == 0) pair_loss[p] = pair_total;
  // Last pair: the loss is the pair losses summed in pair order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[n_pairs], 1u) == static_cast<unsigned>(n_pairs - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  local = 0;
  for (int64_t q = threadIdx.x; q < n_pairs; q += kThreads) local += __ldcg(pair_loss + q);
  const A total = block_sum(local, scratch);
  if (threadIdx.x == 0) *loss = total;
}

// KS din columns per slab: 32 for fp32 accumulation, 16 for fp64 (static shared memory stays under 48 KB).
template <typename T, typename A, int KS>
__global__ void __launch_bounds__(kThreads) orth_bwd_kernel(const OrthPairDesc* __restrict__ pairs,
                                                            const int* __restrict__ item_pair,
                                                            const A* __restrict__ signs, const A* __restrict__ grad) {
  constexpr int kRow = KS + 4;
  constexpr int kColTiles = KS / 4;
  __shared__ __align__(16) float s[kMaxOrthRank * kPad];   // sign(P)[r][c]: exact in fp32
  __shared__ __align__(16) A xs[kMaxOrthRank * kRow];      // A_base chunk [r1][KS]
  __shared__ __align__(16) A ys[kMaxOrthRank * kRow];      // A_orth chunk [r2][KS]
  const int p = item_pair[blockIdx.x];
  const OrthPairDesc d = pairs[p];
  const int r1 = static_cast<int>(d.r1), r2 = static_cast<int>(d.r2);
  const int64_t din = d.din;
  const int64_t d0 = (blockIdx.x - d.first_item) * kOrthBwdChunk, d1 = min(din, d0 + kOrthBwdChunk);
  T* gb = reinterpret_cast<T*>(d.g_base);
  T* go = reinterpret_cast<T*>(d.g_orth);
  const A g = *grad;
  for (int e = threadIdx.x; e < r1 * r2; e += kThreads)
    s[(e / r2) * kPad + e % r2] = static_cast<float>(signs[d.sign_offset + e]);
  const int nb = gb ? ((r1 + 3) / 4) * kColTiles : 0;
  const int no = go ? ((r2 + 3) / 4) * kColTiles : 0;
  for (int64_t k0 = d0; k0 < d1; k0 += KS) {
    if (go) stage<KS, kRow, false>(xs, reinterpret_cast<const T*>(d.a_base), r1, din, k0, d1);
    if (gb) stage<KS, kRow, false>(ys, reinterpret_cast<const T*>(d.a_orth), r2, din, k0, d1);
    __syncthreads();
    for (int t = threadIdx.x; t < nb + no; t += kThreads) {
      const bool base = t < nb;
      const int u = base ? t : t - nb;
      const int q0 = (u / kColTiles) * 4, k = (u % kColTiles) * 4;  // output rows q0.., columns k0 + k..
      A acc[4][4] = {};
      if (base) {  // dA_base[q][k] = sum_c s[q][c] A_orth[c][k]
        for (int c = 0; c < r2; ++c) {
          A y[4];
          load4(ys + c * kRow + k, y);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const A sv = s[(q0 + i) * kPad + c];
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += sv * y[j];
          }
        }
      } else {     // dA_orth[q][k] = sum_r s[r][q] A_base[r][k]
        for (int r = 0; r < r1; ++r) {
          A x[4];
          load4(xs + r * kRow + k, x);
          const float4 sv = *reinterpret_cast<const float4*>(s + r * kPad + q0);
          const float sq[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += static_cast<A>(sq[i]) * x[j];
        }
      }
      T* out = base ? gb : go;
      const int rows = base ? r1 : r2;
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          if (q0 + i < rows && k0 + k + j < d1) out[(q0 + i) * din + k0 + k + j] = from_acc<T>(g * acc[i][j]);
    }
    __syncthreads();
  }
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::fprintf(stderr, "medcare: %s launch failed: %s\n", what, cudaGetErrorString(err));
    std::abort();  // an unlaunched kernel would return garbage silently; the binding validated the shapes
  }
}

template <typename T, typename A>
void fwd_typed(const void* table, int64_t n_pairs, int64_t n_items, void* partials, void* pair_loss, void* signs,
               void* loss, cudaStream_t st) {
  const char* base = static_cast<const char*>(table);
  orth_fwd_kernel<T, A><<<n_items, kThreads, 0, st>>>(
      reinterpret_cast<const OrthPairDesc*>(base), reinterpret_cast<const int*>(base + orth_items_offset(n_pairs)),
      reinterpret_cast<unsigned*>(const_cast<char*>(base) + orth_counters_offset(n_pairs, n_items)), n_pairs,
      static_cast<A*>(partials), static_cast<A*>(pair_loss), static_cast<A*>(signs), static_cast<A*>(loss));
  check_launch("orth_penalty forward");
}

template <typename T, typename A>
void bwd_typed(const void* table, int64_t n_pairs, int64_t n_items, const void* signs, const void* grad,
               cudaStream_t st) {
  const char* base = static_cast<const char*>(table);
  orth_bwd_kernel<T, A, 128 / sizeof(A)><<<n_items, kThreads, 0, st>>>(
      reinterpret_cast<const OrthPairDesc*>(base), reinterpret_cast<const int*>(base + orth_items_offset(n_pairs)),
      static_cast<const A*>(signs), static_cast<const A*>(grad));
  check_launch("orth_penalty backward");
}

}  // namespace

void orth_penalty_fwd_cuda(DType dt, const void* table, int64_t n_pairs, int64_t n_items, void* partials,
                           void* pair_loss, void* signs, void* loss, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: fwd_typed<float, float>(table, n_pairs, n_items, partials, pair_loss, signs, loss, st); break;
    case DType::kFloat16: fwd_typed<__half, float>(table, n_pairs, n_items, partials, pair_loss, signs, loss, st); break;
    case DType::kBFloat16:
      fwd_typed<__nv_bfloat16, float>(table, n_pairs, n_items, partials, pair_loss, signs, loss, st); break;
    case DType::kFloat64:
      fwd_typed<double, double>(table, n_pairs, n_items, partials, pair_loss, signs, loss, st); break;
  }
}

void orth_penalty_bwd_cuda(DType dt, const void* table, int64_t n_pairs, int64_t n_items, const void* signs,
                           const void* grad, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: bwd_typed<float, float>(table, n_pairs, n_items, signs, grad, st); break;
    case DType::kFloat16: bwd_typed<__half, float>(table, n_pairs, n_items, signs, grad, st); break;
    case DType::kBFloat16: bwd_typed<__nv_bfloat16, float>(table, n_pairs, n_items, signs, grad, st); break;
    case DType::kFloat64: bwd_typed<double, double>(table, n_pairs, n_items, signs, grad, st); break;
  }
}

}  // namespace medcare
