// Shared helpers for the medcare C++ ops. Only standard headers here, so the .cu files that include it
// compile with nvcc alone (no torch headers) on machines without a GPU.
#pragma once

#include <cstdint>

namespace medcare {

// Round a up to a multiple of b (tile sizes, padded ranks).
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace medcare
