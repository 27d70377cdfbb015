// Small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
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
// Chunks are converted to fp32 and reduced with branch-free loops the compiler
// vectorises; only a chunk that improves the maximum is searched for its index.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  constexpr int64_t kChunk = 512;
  float buf[kChunk];
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_i = -1;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
    for (int64_t i = 0; i < m; ++i) buf[i] = static_cast<float>(x[c0 + i]);
    // Independent lanes: an element-wise max the compiler turns into vector instructions (a single
    // running max is a serial dependency chain it may not reorder, because of NaN and signed zeros). NaNs are
    // flagged by a float sum of v * 0 (NaN for a NaN, also for an inf: a false alarm costs an exact scan).
    constexpr int kLanes = 32;  // two AVX-512 vectors (four AVX2): enough independent chains to hide latency
    float lane[kLanes];
    float lane_nan[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      lane[j] = -std::numeric_limits<float>::infinity();
      lane_nan[j] = 0.0f;
    }
    int64_t i = 0;
    for (; i + kLanes <= m; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = buf[i + j];
        lane[j] = v > lane[j] ? v : lane[j];
        lane_nan[j] += v * 0.0f;
      }
    }
    float cm = -std::numeric_limits<float>::infinity();
    int nan = 0;
    for (int j = 0; j < kLanes; ++j) {
      cm = lane[j] > cm ? lane[j] : cm;
      nan |= lane_nan[j] != lane_nan[j];
    }
    for (; i < m; ++i) {
      cm = buf[i] > cm ? buf[i] : cm;
      nan |= buf[i] != buf[i];
    }
    if (nan) {
      for (int64_t i = 0; i < m; ++i)
        if (buf[i] != buf[i]) return c0 + i;
    }
    if (best_i < 0 || cm > best) {
      for (int64_t i = 0; i < m; ++i) {
        if (buf[i] == cm) {
          best_i = c0 + i;
          break;
        }
      }
      best = cm;
    }
  }
  return best_i < 0 ? 0 : best_i;
}

}  // namespace cpu
}  // namespace vispec
