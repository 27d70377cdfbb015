// y = x W^T + b for the few rows of a tree verification (1..~32) on the CPU, fp32.
//
// Why a kernel of our own: at 13 rows a 135M-parameter model's linears stream their weights from DRAM
// once per forward, but the BLAS's small-M path costs about twice the 1-row gemv (the weights are
// packed per call), while the rows' arithmetic would hide under the weight traffic. Here every
// weight vector is loaded once per block of up to kMR rows and meets all of them in registers.
//
// Batch invariance: y[m, n] is computed from x[m] and W[n] alone, in one fixed order (16 fp32 lanes,
// lane j accumulating k = j (mod 16) with fused multiply-adds in increasing k, then the fixed
// reduction tree of reduce16), whatever M, the tile a row falls in, or the thread split. So a row's
// output is bit-identical whether it is verified with 12 others or decoded alone. The AVX-512 and
// portable bodies follow the same order and give the same bits (tests/test_linear.py checks both).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "validate.h"

namespace vispec {
namespace cpu {
namespace {

constexpr int kLanes = 16;
constexpr int kMR = 6;  // rows per register tile
constexpr int kNR = 4;  // weight rows (outputs) per register tile: kMR * kNR accumulators + kNR + 1 <= 32 zmm
// The first row tile of a weight block prefetches the block kAhead blocks on (8 rows, ~18 KB at K=576):
// without it the weight stream waits on DRAM between tiles, and 13 rows took 1.4x as long.
constexpr int kAhead = 2;

// Lanes i and i + 8, then i + 4, i + 2, i + 1: the order reduce16_avx512 follows with shuffles.
inline float reduce16(const float* a) {
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s[i] += s[i + 4];
  for (int i = 0; i < 2; ++i) s[i] += s[i + 2];
  return s[0] + s[1];
}

float dot_scalar(const float* x, const float* w, int64_t K) {
  float acc[kLanes] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      // The vector body's masked tail loads zeros: fma(0, 0, acc) is acc + 0 there too (-0 becomes +0).
      const bool in = k0 + j < K;
      acc[j] = std::fma(in ? x[k0 + j] : 0.0f, in ? w[k0 + j] : 0.0f, acc[j]);
    }
  }
  return reduce16(acc);
}

struct LinearArgs {
  const float* x;     // (M, K), row stride sx
  const float* w;     // (N, K), row stride sw
  const float* bias;  // (N,) or null
  float* y;           // (M, N) contiguous
  int64_t M, N, K, sx, sw;
};

void linear_rows_scalar(const LinearArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) {
      const float d = dot_scalar(a.x + m * a.sx, a.w + n * a.sw, a.K);
      a.y[m * a.N + n] = a.bias ? d + a.bias[n] : d;
    }
}

#ifdef VISPEC_HAVE_AVX512
VISPEC_AVX512 inline float reduce16_avx512(__m512 t) {
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(1, 0, 3, 2)));  // + lane i ^ 8
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));  // + lane i ^ 4
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));        // + lane i ^ 2
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));        // + lane i ^ 1
  return _mm512_cvtss_f32(t);
}

// One k chunk of a tile: kNR weight vectors, each row's x vector, MR * NR fused multiply-adds.
template <int MR, int NR>
VISPEC_AVX512 __attribute__((always_inline)) inline void tile_step(__m512 (&acc)[MR][NR], const float* x, int64_t sx,
                                                                   const float* w, int64_t sw, __mmask16 mask,
                                                                   const float* ahead) {
  if (ahead) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * sw), _MM_HINT_T0);
  }
  __m512 wv[NR];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * sw);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * sx);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
  }
}

// Rows m0 .. m0 + MR - 1 against weight rows n0 .. n0 + NR - 1, over all of K.
template <int MR, int NR>
VISPEC_AVX512 void tile_avx512(const LinearArgs& a, int64_t m0, int64_t n0, int64_t n_end) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* x = a.x + m0 * a.sx;
  const float* w = a.w + n0 * a.sw;
  const int64_t na = n0 + kAhead * kNR;
  const float* ahead = m0 == 0 && na + kNR <= n_end ? a.w + na * a.sw : nullptr;
  int64_t k = 0;
  for (; k + kLanes <= a.K; k += kLanes) tile_step<MR, NR>(acc, x + k, a.sx, w + k, a.sw, 0xFFFF, ahead ? ahead + k : nullptr);
  if (k < a.K) tile_step<MR, NR>(acc, x + k, a.sx, w + k, a.sw, static_cast<__mmask16>((1u << (a.K - k)) - 1),
                                 ahead ? ahead + k : nullptr);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const float d = reduce16_avx512(acc[i][j]);
      a.y[(m0 + i) * a.N + n0 + j] = a.bias ? d + a.bias[n0 + j] : d;
    }
}

using TileFn = void (*)(const LinearArgs&, int64_t, int64_t, int64_t);

template <int NR>
TileFn tile_for_rows(int64_t mr) {
  switch (mr) {
    case 1: return &tile_avx512<1, NR>;
    case 2: return &tile_avx512<2, NR>;
    case 3: return &tile_avx512<3, NR>;
    case 4: return &tile_avx512<4, NR>;
    case 5: return &tile_avx512<5, NR>;
    default: return &tile_avx512<kMR, NR>;
  }
}

TileFn tile_for(int64_t mr, int64_t nr) {
  static_assert(kMR == 6 && kNR == 4, "tile_for lists the tile sizes");
  switch (nr) {
    case 1: return tile_for_rows<1>(mr);
    case 2: return tile_for_rows<2>(mr);
    case 3: return tile_for_rows<3>(mr);
    default: return tile_for_rows<kNR>(mr);
  }
}

// Weight rows n0 .. n1 - 1 for every row of x: each block of kNR weight rows (a few KB, kept in L1)
// meets all the row tiles before the next block is read, so W crosses the memory bus once.
void linear_rows_avx512(const LinearArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kNR) {
    const int64_t nr = std::min<int64_t>(kNR, n1 - n);
    for (int64_t m = 0; m < a.M; m += kMR) tile_for(std::min<int64_t>(kMR, a.M - m), nr)(a, m, n, n1);
  }
}
#endif

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const LinearArgs a{x.data_ptr<float>(), weight.data_ptr<float>(),
                     bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K,
                     x.stride(0), weight.stride(0)};
  // Threads split the outputs in whole tiles; a block of 64 outputs is ~150 KB of weights at K=576.
  const int64_t tiles = (N + kNR - 1) / kNR;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kNR, n1 = std::min(N, t1 * kNR);
#ifdef VISPEC_HAVE_AVX512
    if (cpu_has_avx512()) return linear_rows_avx512(a, n0, n1);
#endif
    linear_rows_scalar(a, n0, n1);
  });
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CPU, m) { m.impl("linear", &vispec::cpu::linear_cpu); }
