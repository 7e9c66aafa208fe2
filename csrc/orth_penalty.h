// orth_penalty CUDA launchers and the pair table they read: plain C++ (no torch, no CUDA types), shared by
// orth_penalty_cuda.cu (device side) and orth_penalty.cpp (builds the table from the tensors).
#pragma once

#include <cstdint>

#include "common.h"

namespace medcare {

// One (A_base [r1, din], A_orth [r2, din]) pair. Pointers travel as integers so the whole table is one
// buffer, copied to the device with a single host-to-device transfer per launch.
struct OrthPairDesc {
  int64_t a_base, a_orth;   // parameter data (contiguous, all pairs share one dtype)
  int64_t g_base, g_orth;   // backward only: gradient outputs, 0 when that side needs no gradient
  int64_t din, r1, r2;
  int64_t first_item;       // work items of this pair are [first_item, first_item + n_items): D-chunks
  int64_t n_items;
  int64_t partial_offset;   // forward: n_items partial products of r1 * r2 values start here in the workspace
  int64_t sign_offset;      // r1 * r2 signs of P = A_base A_orth^T start here in the packed sign buffer
  int64_t reserved;
};

// Table layout (bytes): n_pairs OrthPairDesc | n_items int32 (item -> pair) | n_pairs + 1 uint32 counters
// (zero on upload; the forward's last-block-done reduction counts finished chunks per pair, then pairs).
inline int64_t orth_table_bytes(int64_t n_pairs, int64_t n_items) {
  const int64_t items_bytes = ceil_div(n_items * 4, 8) * 8;
  return n_pairs * static_cast<int64_t>(sizeof(OrthPairDesc)) + items_bytes + (n_pairs + 1) * 4;
}
inline int64_t orth_items_offset(int64_t n_pairs) { return n_pairs * static_cast<int64_t>(sizeof(OrthPairDesc)); }
inline int64_t orth_counters_offset(int64_t n_pairs, int64_t n_items) {
  return orth_items_offset(n_pairs) + ceil_div(n_items * 4, 8) * 8;
}

// Columns of din per work item: forward (P partials; fewer, longer chunks keep the workspace small) and
// backward (gradient tiles; no workspace).
constexpr int64_t kOrthFwdChunk = 1024;
constexpr int64_t kOrthBwdChunk = 256;

// P_i = A_base_i A_orth_i^T for every pair in one launch; writes signs (sign(P), sign(0) = 0) and the scalar
// loss = sum_i sum |P_i| in acc dtype (fp32, fp64 for fp64 parameters). Deterministic: chunk partials are
// reduced in a fixed order by the last block of each pair, pair losses in pair order by the last pair.
// partials: sum_i n_items_i * r1_i * r2_i acc values; pair_loss: n_pairs acc values (both scratch).
void orth_penalty_fwd_cuda(DType dt, const void* table, int64_t n_pairs, int64_t n_items, void* partials,
                           void* pair_loss, void* signs, void* loss, void* stream);

// d A_base_i = g sign(P_i) A_orth_i, d A_orth_i = g sign(P_i)^T A_base_i for every pair in one launch, written
// in the parameters' dtype straight into the table's g_base / g_orth; g is read from the device (no sync).
void orth_penalty_bwd_cuda(DType dt, const void* table, int64_t n_pairs, int64_t n_items, const void* signs,
                           const void* grad, void* stream);

}  // namespace medcare
