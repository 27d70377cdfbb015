// Small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

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

// ---------------------------------------------------------------------------
// Row scans at memory speed
// ---------------------------------------------------------------------------
// The extension is built for baseline x86-64; the scans below have an AVX-512 body (explicit
// intrinsics: GCC does not vectorise a max-reduction with NaN semantics reliably) picked at run
// time when the CPU has it, and a portable scalar body with the same results otherwise.
constexpr int64_t kScanChunk = 64;  // values per chunk maximum

struct RowScan {
  float max;  // largest value, NaN ignored; -inf when there is none
  bool nan;   // some value is NaN
};

template <typename T>
inline RowScan row_scan_scalar(const T* x, int64_t n, float* chunk_max) {
  RowScan r{-std::numeric_limits<float>::infinity(), false};
  for (int64_t c0 = 0; c0 < n; c0 += kScanChunk) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = c0, e = std::min(n, c0 + kScanChunk); i < e; ++i) {
      const float v = static_cast<float>(x[i]);
      m = v > m ? v : m;
      r.nan |= v != v;
    }
    if (chunk_max) chunk_max[c0 / kScanChunk] = m;
    r.max = m > r.max ? m : r.max;
  }
  return r;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define VISPEC_HAVE_AVX512 1
#define VISPEC_AVX512 __attribute__((target("avx512f,avx512bw")))

// VISPEC_NO_AVX512=1 (read once) forces the portable bodies: the tests check both give the same results.
inline bool cpu_has_avx512() {
  static const bool yes = std::getenv("VISPEC_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw");
  return yes;
}

// 16 values as fp32 (bf16: the upper half of an fp32; fp16: the hardware conversion).
VISPEC_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
VISPEC_AVX512 inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
VISPEC_AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename T>
VISPEC_AVX512 RowScan row_scan_avx512(const T* x, int64_t n, float* chunk_max) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 all = ninf;
  __mmask16 nan = 0;
  int64_t c0 = 0;
  // _mm512_max_ps(v, acc) returns acc when v is NaN: NaNs never become the maximum, and are flagged apart.
  for (; c0 + kScanChunk <= n; c0 += kScanChunk) {
    const __m512 v0 = load16(x + c0), v1 = load16(x + c0 + 16), v2 = load16(x + c0 + 32), v3 = load16(x + c0 + 48);
    nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v2, v3, _CMP_UNORD_Q);
    const __m512 m = _mm512_max_ps(_mm512_max_ps(v0, ninf), _mm512_max_ps(v2, _mm512_max_ps(v1, _mm512_max_ps(v3, ninf))));
    if (chunk_max) chunk_max[c0 / kScanChunk] = _mm512_reduce_max_ps(m);
    all = _mm512_max_ps(m, all);
  }
  RowScan r{_mm512_reduce_max_ps(all), nan != 0};
  if (c0 < n) {  // the last, partial chunk
    const RowScan t = row_scan_scalar(x + c0, n - c0, chunk_max ? chunk_max + c0 / kScanChunk : nullptr);
    r.max = t.max > r.max ? t.max : r.max;
    r.nan |= t.nan;
  }
  return r;
}
#endif

// Max and NaN flag of x[0, n); chunk_max (if given, ceil(n / kScanChunk) floats) gets every chunk's max.
template <typename T>
RowScan row_scan(const T* x, int64_t n, float* chunk_max = nullptr) {
#ifdef VISPEC_HAVE_AVX512
  if (cpu_has_avx512()) return row_scan_avx512(x, n, chunk_max);
#endif
  return row_scan_scalar(x, n, chunk_max);
}

// torch.argmax semantics: first maximum, a NaN beats every number (first NaN wins). One vectorised pass
// for the chunk maxima; then only the first chunk that holds the maximum is searched for its index.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  constexpr int64_t kStack = 4096;  // chunk maxima of rows up to 256k values live on the stack
  float stack[kStack];
  std::vector<float> heap;
  const int64_t chunks = (n + kScanChunk - 1) / kScanChunk;
  float* cm = chunks <= kStack ? stack : (heap.resize(chunks), heap.data());
  const RowScan r = row_scan(x, n, cm);
  if (r.nan) {
    for (int64_t i = 0; i < n; ++i)
      if (static_cast<float>(x[i]) != static_cast<float>(x[i])) return i;
  }
  for (int64_t c = 0; c < chunks; ++c) {
    if (cm[c] != r.max) continue;  // (-0.0 == 0.0, as torch compares them)
    for (int64_t i = c * kScanChunk, e = std::min(n, i + kScanChunk); i < e; ++i)
      if (static_cast<float>(x[i]) == r.max) return i;
  }
  return 0;  // n == 0
}

}  // namespace cpu
}  // namespace vispec
