// Small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace vispec {
namespace cpu {

// Calls f with a null pointer of the element type of a float tensor; one flat switch.
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

// torch.argmax semantics: first maximum, a NaN beats every number (first NaN wins).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t best = 0;
  float bv = static_cast<float>(x[0]);
  if (std::isnan(bv)) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v)) return i;
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;
}

}  // namespace cpu
}  // namespace vispec
