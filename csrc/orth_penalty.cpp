// orth_penalty: argument checks, the CPU implementation (what CI runs) and the CUDA binding of orth_penalty_cuda.cu.
// Schemas: csrc/ops.cpp. Python side (register_fake, register_autograd): medcare_kernels/_ext.py.
//   orth_penalty(a_base[i] [r1_i, din_i], a_orth[i] [r2_i, din_i]) -> loss (0-d), signs (sum_i r1_i r2_i)
//   orth_penalty_backward(grad, signs, a_base, a_orth, need_base, need_orth) -> d_base, d_orth (each side flat,
//   parameter after parameter; [0] for a side that needs none)
// loss and signs are fp32 (fp64 for fp64 parameters); signs = sign(A_base_i A_orth_i^T), packed pair after pair,
// is all the backward keeps. The gradients come back in the parameters' dtype. All tensors share one dtype and
// device (medcare_kernels._ext casts mixed dtypes first).
#include <torch/library.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "binding.h"
#include "orth_penalty.h"

namespace medcare {
namespace {

using TensorList = std::vector<at::Tensor>;

void check_pairs(const TensorList& a_base, const TensorList& a_orth, const char* op) {
  TORCH_CHECK_VALUE(!a_base.empty(), op, ": a_base and a_orth are empty; expected at least one pair");
  TORCH_CHECK_VALUE(a_base.size() == a_orth.size(), op, ": a_base and a_orth must pair up, got ", a_base.size(),
                    " and ", a_orth.size(), " tensors");
  const auto& first = a_base[0];
  TORCH_CHECK_VALUE(is_kernel_float(first.scalar_type()), op,
                    ": parameters must be float16, bfloat16, float32 or float64, got ", first.scalar_type());
  for (size_t i = 0; i < a_base.size(); ++i) {
    const auto &a = a_base[i], &b = a_orth[i];
    TORCH_CHECK_VALUE(a.dim() == 2, op, ": a_base[", i, "] must be 2-D [R1, Din], got ", a.sizes());
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(1) == a.size(1), op, ": a_orth[", i, "] must have shape [R2, ",
                      a.size(1), "] (the Din of a_base[", i, "]), got ", b.sizes());
    TORCH_CHECK_VALUE(a.scalar_type() == first.scalar_type() && b.scalar_type() == first.scalar_type(), op,
                      ": all parameters must share one dtype; pair ", i, " is ", a.scalar_type(), "/",
                      b.scalar_type(), ", a_base[0] is ", first.scalar_type());
    TORCH_CHECK_VALUE(a.device() == first.device() && b.device() == first.device(), op, ": pair ", i, " is on ",
                      a.device(), "/", b.device(), " but a_base[0] is on ", first.device());
  }
}

int64_t sign_elems(const TensorList& a_base, const TensorList& a_orth) {
  int64_t n = 0;
  for (size_t i = 0; i < a_base.size(); ++i) n += a_base[i].size(0) * a_orth[i].size(0);
  return n;
}

std::tuple<at::Tensor, at::Tensor> orth_penalty_cpu(const TensorList& a_base, const TensorList& a_orth) {
  check_pairs(a_base, a_orth, "orth_penalty");
  const auto acc = acc_dtype(a_base[0].scalar_type());
  std::vector<at::Tensor> sums, signs;
  for (size_t i = 0; i < a_base.size(); ++i) {
    const auto p = at::mm(a_base[i].to(acc), a_orth[i].to(acc).t());
    sums.push_back(p.abs().sum());
    signs.push_back(p.sign().reshape({-1}));
  }
  return {at::stack(sums).sum(), at::cat(signs)};
}

void check_backward(const at::Tensor& grad, const at::Tensor& signs, const TensorList& a_base,
                    const TensorList& a_orth) {
  check_pairs(a_base, a_orth, "orth_penalty_backward");
  const auto acc = acc_dtype(a_base[0].scalar_type());
  TORCH_CHECK_VALUE(grad.numel() == 1 && grad.device() == a_base[0].device(),
                    "orth_penalty_backward: grad must be one value on ", a_base[0].device(), ", got ", grad.sizes(),
                    " on ", grad.device());
  TORCH_CHECK_VALUE(signs.dim() == 1 && signs.size(0) == sign_elems(a_base, a_orth) && signs.scalar_type() == acc &&
                        signs.device() == a_base[0].device(),
                    "orth_penalty_backward: signs must be ", acc, " [", sign_elems(a_base, a_orth), "] on ",
                    a_base[0].device(), ", got ", signs.scalar_type(), " ", signs.sizes(), " on ", signs.device());
}

// One side's gradients in one allocation, parameter after parameter (the op's output), and its per-parameter
// views (what the kernels write through): one allocator call instead of one per parameter.
struct FlatGrads {
  at::Tensor flat;
  TensorList views;
};

FlatGrads flat_like(const TensorList& ts, bool needed) {
  if (!needed) return {at::empty({0}, ts[0].options()), {}};
  std::vector<int64_t> numels;
  numels.reserve(ts.size());
  for (const auto& t : ts) numels.push_back(t.numel());
  FlatGrads g{at::empty({std::accumulate(numels.begin(), numels.end(), int64_t{0})}, ts[0].options()), {}};
  const auto parts = g.flat.split_with_sizes(numels);
  g.views.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) g.views.push_back(parts[i].view(ts[i].sizes()));
  return g;
}

std::tuple<at::Tensor, at::Tensor> orth_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& signs,
                                                             const TensorList& a_base, const TensorList& a_orth,
                                                             bool need_base, bool need_orth) {
  check_backward(grad, signs, a_base, a_orth);
  const auto acc = acc_dtype(a_base[0].scalar_type());
  const auto g = grad.reshape({}).to(acc);
  auto d_base = flat_like(a_base, need_base), d_orth = flat_like(a_orth, need_orth);
  int64_t off = 0;
  for (size_t i = 0; i < a_base.size(); ++i) {
    const int64_t r1 = a_base[i].size(0), r2 = a_orth[i].size(0);
    const auto s = signs.narrow(0, off, r1 * r2).view({r1, r2}) * g;
    off += r1 * r2;
    if (need_base) d_base.views[i].copy_(at::mm(s, a_orth[i].to(acc)));
    if (need_orth) d_orth.views[i].copy_(at::mm(s.t(), a_base[i].to(acc)));
  }
  return {d_base.flat, d_orth.flat};
}

#ifdef MEDCARE_WITH_CUDA
TensorList contiguous(const TensorList& ts) {
  TensorList out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// The pair table (orth_penalty.h) in pinned host memory, uploaded with one asynchronous copy. Work items are
// chunks of `chunk` din columns; an empty pair (din = 0) still gets one item so that it reports a zero loss.
struct Table {
  at::Tensor device;
  int64_t n_items = 0;
  int64_t partial_elems = 0;
};

Table upload_table(const TensorList& a_base, const TensorList& a_orth, int64_t chunk, const TensorList& g_base,
                   const TensorList& g_orth) {
  const int64_t n_pairs = static_cast<int64_t>(a_base.size());
  std::vector<OrthPairDesc> descs(n_pairs);
  Table t;
  int64_t sign_off = 0;
  for (int64_t i = 0; i < n_pairs; ++i) {
    const auto &a = a_base[i], &b = a_orth[i];
    auto& d = descs[i];
    d.a_base = reinterpret_cast<int64_t>(a.data_ptr());
    d.a_orth = reinterpret_cast<int64_t>(b.data_ptr());
    d.g_base = g_base.empty() ? 0 : reinterpret_cast<int64_t>(g_base[i].data_ptr());
    d.g_orth = g_orth.empty() ? 0 : reinterpret_cast<int64_t>(g_orth[i].data_ptr());
    d.din = a.size(1);
    d.r1 = a.size(0);
    d.r2 = b.size(0);
    d.first_item = t.n_items;
    d.n_items = std::max<int64_t>(1, ceil_div(d.din, chunk));
    d.partial_offset = t.partial_elems;
    d.sign_offset = sign_off;
    d.reserved = 0;
    t.n_items += d.n_items;
    t.partial_elems += d.n_items * d.r1 * d.r2;
    sign_off += d.r1 * d.r2;
  }
  TORCH_CHECK_VALUE(t.n_items < (int64_t{1} << 31), "orth_penalty: too many din chunks (", t.n_items, ")");
  auto host = at::empty({orth_table_bytes(n_pairs, t.n_items)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* bytes = host.data_ptr<uint8_t>();
  std::memcpy(bytes, descs.data(), n_pairs * sizeof(OrthPairDesc));
  auto* items = reinterpret_cast<int32_t*>(bytes + orth_items_offset(n_pairs));
  for (int64_t i = 0; i < n_pairs; ++i)
    for (int64_t c = 0; c < descs[i].n_items; ++c) items[descs[i].first_item + c] = static_cast<int32_t>(i);
  std::memset(bytes + orth_counters_offset(n_pairs, t.n_items), 0, (n_pairs + 1) * 4);
  t.device = host.to(a_base[0].device(), /*non_blocking=*/true);
  return t;
}

void check_cuda_ranks(const TensorList& a_base, const TensorList& a_orth) {
  for (size_t i = 0; i < a_base.size(); ++i)
    TORCH_CHECK_VALUE(a_base[i].size(0) <= kMaxOrthRank && a_orth[i].size(0) <= kMaxOrthRank,
                      "orth_penalty: the CUDA kernel handles ranks <= ", kMaxOrthRank, ", pair ", i, " has ",
                      a_base[i].size(0), " and ", a_orth[i].size(0));
}

std::tuple<at::Tensor, at::Tensor> orth_penalty_cuda(const TensorList& a_base_in, const TensorList& a_orth_in) {
  check_pairs(a_base_in, a_orth_in, "orth_penalty");
  check_cuda_ranks(a_base_in, a_orth_in);
  c10::DeviceGuard guard(a_base_in[0].device());
  const auto a_base = contiguous(a_base_in), a_orth = contiguous(a_orth_in);
  const auto opts = a_base[0].options().dtype(acc_dtype(a_base[0].scalar_type()));
  const auto table = upload_table(a_base, a_orth, kOrthFwdChunk, {}, {});
  auto loss = at::empty({}, opts);
  auto signs = at::empty({sign_elems(a_base, a_orth)}, opts);
  auto partials = at::empty({table.partial_elems}, opts);
  auto pair_loss = at::empty({static_cast<int64_t>(a_base.size())}, opts);
  orth_penalty_fwd_cuda(to_dtype(a_base[0].scalar_type()), table.device.data_ptr(),
                        static_cast<int64_t>(a_base.size()), table.n_items, partials.data_ptr(),
                        pair_loss.data_ptr(), signs.data_ptr(), loss.data_ptr(), current_stream(loss.device()));
  return {loss, signs};
}

std::tuple<at::Tensor, at::Tensor> orth_penalty_backward_cuda(const at::Tensor& grad_in, const at::Tensor& signs_in,
                                                               const TensorList& a_base_in,
                                                               const TensorList& a_orth_in, bool need_base,
                                                               bool need_orth) {
  check_backward(grad_in, signs_in, a_base_in, a_orth_in);
  check_cuda_ranks(a_base_in, a_orth_in);
  c10::DeviceGuard guard(a_base_in[0].device());
  const auto a_base = contiguous(a_base_in), a_orth = contiguous(a_orth_in);
  const auto acc = acc_dtype(a_base[0].scalar_type());
  const auto grad = grad_in.reshape({}).to(acc).contiguous();
  const auto signs = signs_in.contiguous();
  auto d_base = flat_like(a_base, need_base), d_orth = flat_like(a_orth, need_orth);
  if (!need_base && !need_orth) return {d_base.flat, d_orth.flat};
  const auto table = upload_table(a_base, a_orth, kOrthBwdChunk, d_base.views, d_orth.views);
  orth_penalty_bwd_cuda(to_dtype(a_base[0].scalar_type()), table.device.data_ptr(),
                        static_cast<int64_t>(a_base.size()), table.n_items, signs.data_ptr(), grad.data_ptr(),
                        current_stream(grad.device()));
  return {d_base.flat, d_orth.flat};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(medcare, CPU, m) {
  m.impl("orth_penalty", &orth_penalty_cpu);
  m.impl("orth_penalty_backward", &orth_penalty_backward_cpu);
}

#ifdef MEDCARE_WITH_CUDA
TORCH_LIBRARY_IMPL(medcare, CUDA, m) {
  m.impl("orth_penalty", &orth_penalty_cuda);
  m.impl("orth_penalty_backward", &orth_penalty_backward_cuda);
}
#endif

}  // namespace medcare
