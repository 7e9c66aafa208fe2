// Shared helpers for the medcare C++ ops. Only standard headers here, so the .cu files that include it
// compile with nvcc alone (no torch headers) on machines without a GPU.
#pragma once

#include <cstdint>

namespace medcare {

// Round a up to a multiple of b (tile sizes, padded ranks).
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The element types the kernels are instantiated for. The torch-side files map at::ScalarType to this, so the
// pure-CUDA launchers never see a torch type.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Router and penalty limits (docs/design.md; E <= 64 experts, K <= 8, adapter ranks <= 64).
constexpr int kMaxExperts = 64;
constexpr int kMaxTopK = 8;
constexpr int kMaxOrthRank = 64;

}  // namespace medcare
