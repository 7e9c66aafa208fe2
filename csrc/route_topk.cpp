// route_topk: argument checks, the CPU implementation (what CI runs) and the CUDA binding of route_topk_cuda.cu.
// Schemas: csrc/ops.cpp. Python side (register_fake, register_autograd): medcare_kernels/_ext.py.
//   route_topk(logits [..., E], K) -> gates [..., E] (fp32 | fp64), indices [..., K] int64, stats [..., 2]
//   route_topk_backward(d_gates [..., E], logits, indices, stats) -> d_logits [..., E] (logits' dtype)
// stats = (max logit, sum of exp(logit - max)) per token: the backward recomputes p from the logits with them.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "binding.h"
#include "route_topk.h"

namespace medcare {
namespace {

std::vector<int64_t> lead_with(const at::Tensor& t, int64_t last) {
  auto shape = t.sizes().vec();
  shape.back() = last;
  return shape;
}

void check_logits(const at::Tensor& logits, int64_t top_k) {
  TORCH_CHECK_VALUE(is_kernel_float(logits.scalar_type()),
                    "route_topk: logits must be float16, bfloat16, float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1,
                    "route_topk: logits must have shape [..., E] with E >= 1, got ", logits.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= logits.size(-1), "route_topk: top_k must be in [1, E = ",
                    logits.size(-1), "], got ", top_k);
}

void check_backward(const at::Tensor& d_gates, const at::Tensor& logits, const at::Tensor& indices,
                    const at::Tensor& stats) {
  check_logits(logits, indices.dim() ? indices.size(-1) : 0);
  const auto acc = acc_dtype(logits.scalar_type());
  TORCH_CHECK_VALUE(d_gates.sizes() == logits.sizes() && d_gates.scalar_type() == acc,
                    "route_topk_backward: d_gates must be ", acc, " ", logits.sizes(), ", got ",
                    d_gates.scalar_type(), " ", d_gates.sizes());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong && indices.sizes() == lead_with(logits, indices.size(-1)),
                    "route_topk_backward: indices must be int64 [..., K] matching logits ", logits.sizes(),
                    ", got ", indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK_VALUE(stats.scalar_type() == acc && stats.sizes() == lead_with(logits, 2),
                    "route_topk_backward: stats must be ", acc, " [..., 2], got ", stats.scalar_type(), " ",
                    stats.sizes());
  for (const auto* t : {&d_gates, &indices, &stats})
    TORCH_CHECK_VALUE(t->device() == logits.device(), "route_topk_backward: all tensors must be on ",
                      logits.device(), ", got one on ", t->device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& logits, int64_t top_k) {
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  return {at::empty(logits.sizes(), opts), at::empty(lead_with(logits, top_k), logits.options().dtype(at::kLong)),
          at::empty(lead_with(logits, 2), opts)};
}

// One token: p = softmax(l); K arg-max rounds over the untaken experts (strict >, so ties go to the lower
// index, as the CUDA kernel); gates = p / sum of the selected p on the selected experts, 0 elsewhere.
template <typename scalar_t, typename acc_t>
void route_token(const scalar_t* l, int64_t E, int64_t K, acc_t* p, char* taken, acc_t* gates, int64_t* idx,
                 acc_t* stats) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<acc_t>(l[e]));
  acc_t s = 0;
  for (int64_t e = 0; e < E; ++e) s += (p[e] = std::exp(static_cast<acc_t>(l[e]) - m));
  for (int64_t e = 0; e < E; ++e) {
    p[e] /= s;
    taken[e] = 0;
  }
  acc_t z = 0;
  for (int64_t k = 0; k < K; ++k) {
    acc_t best = -1;
    int64_t bi = E;
    for (int64_t e = 0; e < E; ++e)
      if (!taken[e] && p[e] > best) { best = p[e]; bi = e; }
    if (bi >= E) bi = E - 1;  // NaN logits only; keeps every index in range
    taken[bi] = 1;
    idx[k] = bi;
    z += best;
  }
  for (int64_t e = 0; e < E; ++e) gates[e] = taken[e] ? p[e] / z : acc_t(0);
  stats[0] = m;
  stats[1] = s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_topk_cpu(const at::Tensor& logits_in, int64_t top_k) {
  check_logits(logits_in, top_k);
  const auto logits = logits_in.contiguous();
  at::Tensor gates, indices, stats;  // not structured bindings: C++17 lambdas cannot capture those
  std::tie(gates, indices, stats) = empty_outputs(logits, top_k);
  const int64_t E = logits.size(-1), T = logits.numel() / E;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_topk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* l = logits.data_ptr<scalar_t>();
    auto* g = gates.data_ptr<acc_t>();
    auto* ix = indices.data_ptr<int64_t>();
    auto* st = stats.data_ptr<acc_t>();
    at::parallel_for(0, T, 512, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E);
      std::vector<char> taken(E);
      for (int64_t t = begin; t < end; ++t)
        route_token(l + t * E, E, top_k, p.data(), taken.data(), g + t * E, ix + t * top_k, st + 2 * t);
    });
  });
  return {gates, indices, stats};
}

// dp = (dw - sum_sel dw w) / Z on the selected experts (w = p / Z), 0 elsewhere; dl = p (dp - sum_e p_e dp_e).
template <typename scalar_t, typename acc_t>
void route_token_bwd(const acc_t* dg, const scalar_t* l, const int64_t* idx, const acc_t* stats, int64_t E,
                     int64_t K, acc_t* p, acc_t* dp, scalar_t* dl) {
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(static_cast<acc_t>(l[e]) - stats[0]) / stats[1];
    dp[e] = 0;
  }
  acc_t z = 0, s1 = 0, s2 = 0;
  for (int64_t k = 0; k < K; ++k) z += p[idx[k]];
  for (int64_t k = 0; k < K; ++k) s1 += dg[idx[k]] * (p[idx[k]] / z);
  for (int64_t k = 0; k < K; ++k) dp[idx[k]] = (dg[idx[k]] - s1) / z;
  for (int64_t e = 0; e < E; ++e) s2 += p[e] * dp[e];
  for (int64_t e = 0; e < E; ++e) dl[e] = static_cast<scalar_t>(p[e] * (dp[e] - s2));
}

at::Tensor route_topk_backward_cpu(const at::Tensor& d_gates_in, const at::Tensor& logits_in,
                                   const at::Tensor& indices_in, const at::Tensor& stats_in) {
  check_backward(d_gates_in, logits_in, indices_in, stats_in);
  const auto d_gates = d_gates_in.contiguous(), logits = logits_in.contiguous();
  const auto indices = indices_in.contiguous(), stats = stats_in.contiguous();
  auto d_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t E = logits.size(-1), T = logits.numel() / E, K = indices.size(-1);
  TORCH_CHECK_VALUE(T == 0 || (indices.min().item<int64_t>() >= 0 && indices.max().item<int64_t>() < E),
                    "route_topk_backward: indices must lie in [0, E = ", E, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_topk_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* dg = d_gates.data_ptr<acc_t>();
    const auto* l = logits.data_ptr<scalar_t>();
    const auto* ix = indices.data_ptr<int64_t>();
    const auto* st = stats.data_ptr<acc_t>();
    auto* dl = d_logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, 512, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E), dp(E);
      for (int64_t t = begin; t < end; ++t)
        route_token_bwd(dg + t * E, l + t * E, ix + t * K, st + 2 * t, E, K, p.data(), dp.data(), dl + t * E);
    });
  });
  return d_logits;
}

#ifdef MEDCARE_WITH_CUDA
void check_cuda_limits(int64_t E, int64_t K) {
  TORCH_CHECK_VALUE(E <= kMaxExperts && K <= kMaxTopK, "route_topk: the CUDA kernel handles E <= ", kMaxExperts,
                    " experts and top_k <= ", kMaxTopK, ", got E = ", E, ", top_k = ", K);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_topk_cuda(const at::Tensor& logits_in, int64_t top_k) {
  check_logits(logits_in, top_k);
  check_cuda_limits(logits_in.size(-1), top_k);
  c10::DeviceGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  at::Tensor gates, indices, stats;  // not structured bindings: C++17 lambdas cannot capture those
  std::tie(gates, indices, stats) = empty_outputs(logits, top_k);
  const int64_t E = logits.size(-1);
  route_topk_fwd_cuda(to_dtype(logits.scalar_type()), logits.data_ptr(), logits.numel() / E, static_cast<int>(E),
                      static_cast<int>(top_k), gates.data_ptr(), indices.data_ptr<int64_t>(), stats.data_ptr(),
                      current_stream(logits.device()));
  return {gates, indices, stats};
}

at::Tensor route_topk_backward_cuda(const at::Tensor& d_gates_in, const at::Tensor& logits_in,
                                    const at::Tensor& indices_in, const at::Tensor& stats_in) {
  check_backward(d_gates_in, logits_in, indices_in, stats_in);
  check_cuda_limits(logits_in.size(-1), indices_in.size(-1));
  c10::DeviceGuard guard(logits_in.device());
  const auto d_gates = d_gates_in.contiguous(), logits = logits_in.contiguous();
  const auto indices = indices_in.contiguous(), stats = stats_in.contiguous();
  auto d_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t E = logits.size(-1);
  // Indices come from route_topk's forward (the autograd path); they are not range-checked here, which
  // would cost a device sync per call. The kernel only uses them to mark lanes, never to address memory.
  route_topk_bwd_cuda(to_dtype(logits.scalar_type()), d_gates.data_ptr(), logits.data_ptr(),
                      indices.data_ptr<int64_t>(), stats.data_ptr(), logits.numel() / E, static_cast<int>(E),
                      static_cast<int>(indices.size(-1)), d_logits.data_ptr(), current_stream(logits.device()));
  return d_logits;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(medcare, CPU, m) {
  m.impl("route_topk", &route_topk_cpu);
  m.impl("route_topk_backward", &route_topk_backward_cpu);
}

#ifdef MEDCARE_WITH_CUDA
TORCH_LIBRARY_IMPL(medcare, CUDA, m) {
  m.impl("route_topk", &route_topk_cuda);
  m.impl("route_topk_backward", &route_topk_backward_cuda);
}
#endif

}  // namespace medcare
