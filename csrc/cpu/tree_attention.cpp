// Tree attention on the CPU: one task per (batch row, kv head). All the query heads
// that share a kv head are stacked into one matrix, so each K/V tile is read once
// and both products run as BLAS GEMMs; an online softmax (as in flash attention)
// keeps memory at one tile whatever the prefix. The tree mask is applied only on
// the tiles that hold tree positions. With a sliding window, node n (at position
// L + depth(n), depth = its mask row's bit count - 1) sees prefix keys from
// L + depth(n) - window + 1 on: tiles wholly below every node's first key are skipped,
// the first ones are masked.
//
// Tasks run one after the other and the GEMMs use ATen's intra-op threads. Running
// the tasks under at::parallel_for instead nests BLAS/oneDNN threading inside an
// OpenMP region, which left spinning threads behind and made every later small
// torch op on the same cores milliseconds slow (seen in the engine on 2 cores).
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "validate.h"

namespace vispec {
namespace cpu {
namespace {

// Keys per tile: about 64k scores per tile, so that few query rows (plain MHA,
// small trees) still get large GEMMs and few op calls.
int64_t tile_keys(int64_t rows) { return std::clamp<int64_t>(65536 / std::max<int64_t>(rows, 1), 256, 4096); }

void tree_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cache_lens, const at::Tensor& tree_mask, float scale, int64_t window,
                           at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv;  // query heads per kv head
  const int64_t R = N * G;     // query rows sharing one kv head: row r <-> (node r / G, head hk * G + r % G)
  const int64_t W = tree_mask.size(2);
  const int64_t mask_bstride = tree_mask.size(0) == 1 ? 0 : N * W;
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(tree_mask.data_ptr<int32_t>());
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // (B, N, Hq, D) -> (B, Hkv, N*G, D): row r of kv head hk is (n = r / G, h = hk*G + r % G).
  const at::Tensor qv = q.view({B, N, Hkv, G, D}).permute({0, 2, 1, 3, 4}).reshape({B, Hkv, R, D});
  // out viewed the same way, so results go back with one strided copy per batch row.
  at::Tensor ov = out.view({B, N, Hkv, G, D}).permute({0, 2, 1, 3, 4});
  at::Tensor lv = lse.numel() > 0 ? lse.view({B, N, Hkv, G}).permute({0, 2, 1, 3}) : at::Tensor();
  const int64_t tile = tile_keys(Hkv * R);
  // Tree keys a row must not see (masked_fill, not adding -inf: a hidden key's NaN must not reach the row).
  at::Tensor hidden = at::empty({R, N}, q.options().dtype(at::kBool));
  at::Tensor first_key = at::empty({R}, q.options().dtype(at::kLong));  // window: each row's first visible key

  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens[b];
    // Out of place: for fp32 inputs .to() returns a view of q, which must not change.
    const at::Tensor qf = qv[b].to(at::kFloat).mul(scale);  // (Hkv, R, D)
    at::Tensor acc = at::zeros({Hkv, R, D}, qf.options());
    at::Tensor m = at::full({Hkv, R, 1}, neg_inf, qf.options());
    at::Tensor l = at::zeros({Hkv, R, 1}, qf.options());
    const uint32_t* mrow = mask + b * mask_bstride;
    bool* bp = hidden.data_ptr<bool>();
    int64_t* fk = first_key.data_ptr<int64_t>();
    int64_t lo_min = L, lo_max = 0;  // range of the rows' first visible prefix keys
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = r / G;
      int64_t bits = 0;
      for (int64_t j = 0; j < N; ++j) {
        const bool on = (mrow[n * W + j / 32] >> (j % 32)) & 1u;
        bp[r * N + j] = !on;
        bits += on;
      }
      fk[r] = window > 0 ? std::clamp<int64_t>(L + (bits - 1) - window + 1, 0, L) : 0;
      lo_min = std::min(lo_min, fk[r]);
      lo_max = std::max(lo_max, fk[r]);
    }
    const at::Tensor fk_col = first_key.view({1, R, 1});
    for (int64_t t0 = window > 0 ? lo_min : 0; t0 < L + N; t0 += tile) {
      const int64_t nt = std::min(tile, L + N - t0);
      const at::Tensor kf = k_cache[b].narrow(1, t0, nt).to(at::kFloat);  // (Hkv, nt, D)
      const at::Tensor vf = v_cache[b].narrow(1, t0, nt).to(at::kFloat);
      at::Tensor s = at::bmm(qf, kf.transpose(1, 2));  // (Hkv, R, nt) scaled scores, one GEMM per kv head
      if (window > 0 && t0 < lo_max) {  // keys older than a row's window
        const at::Tensor pos = at::arange(t0, t0 + nt, first_key.options()).view({1, 1, nt});
        s.masked_fill_(pos < fk_col, neg_inf);
      }
      if (t0 + nt > L) {  // this tile holds tree positions: apply the mask there only
        const int64_t c0 = std::max<int64_t>(0, L - t0);  // first tree column of the tile
        s.narrow(2, c0, nt - c0).masked_fill_(hidden.narrow(1, t0 + c0 - L, nt - c0), neg_inf);
      }
      const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(2, /*keepdim=*/true)));
      // Rows with nothing visible yet keep max -inf; shift them by 0 so exp gives 0, not NaN.
      const at::Tensor shift = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);
      const at::Tensor corr = (m - shift).exp_();
      s.sub_(shift).exp_();
      l.mul_(corr).add_(s.sum(2, /*keepdim=*/true));
      acc.mul_(corr).baddbmm_(s, vf);
      m = m_new;
    }
    // A row that sees nothing (no diagonal bit, empty prefix) gets 0 and lse -inf, never 0/0.
    const at::Tensor seen = l > 0;
    const at::Tensor o = at::where(seen, acc / l, at::zeros_like(acc));  // (Hkv, R, D)
    ov[b].copy_(o.view({Hkv, N, G, D}));
    if (lv.defined()) {
      lv[b].copy_(at::where(seen, m + l.log(), at::full_like(m, neg_inf)).view({Hkv, N, G}));
    }
  }
}

#ifdef VISPEC_HAVE_AVX512
// ---------------------------------------------------------------------------
// AVX-512 kernel: the same tiles and online softmax, in registers
// ---------------------------------------------------------------------------
// Compiled for AVX-512 with BF16 dot products; the BF16 instructions appear only in the DP (bf16 dot
// product) instantiation, which runs only on CPUs that have them (AVX-512 alone runs DP = false).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
// One task per (batch row, kv head), tasks spread over the cores (no BLAS inside, so nothing nests).
// Per tile of kTile keys: fp32 K and V read in the cache, other dtypes converted to fp32 once (L1-resident,
// shared by the N*G query rows), K transposed for many rows;
// per row: 16 keys at a time, 16 dot products accumulated over the head dim and reduced with one 16 x 16
// transpose-add, the mask written as -inf (tree tile and window only), exp with an exact 0 for -inf, and
// the P.V update into the row's fp32 accumulator. D is a template parameter (in vectors of 16) so that
// every per-row vector stays in registers.
constexpr int kTile = 64;

VISPEC_AVX512 inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln 2 / 2; Cephes' expf polynomial (about 1 ulp).
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // (second operand returned for NaN: NaN stays NaN)
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));  // exp(-inf) = 0 exactly: hidden keys weigh nothing
}

// out[j] = sum of the 16 lanes of a[j], j = 0..15.
VISPEC_AVX512 inline __m512 transpose_add16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

struct AttnScratch {
  std::vector<float> q, o, k, v, m, l;
  std::vector<uint16_t> qb;   // DP: the rows' q, bf16 as given
  std::vector<uint32_t> vp;   // DP: V tile in key pairs, (kTile / 2, D) words of two bf16
  std::vector<uint32_t> kt;   // DP with many rows: K tile transposed, (D / 2, kTile) words of two bf16
  std::vector<float> ktf;     // fp32 with many rows: K tile transposed, (D, kTile)
  std::vector<int64_t> first_key;
};

__attribute__((noinline)) AttnScratch& attn_scratch() {
  thread_local AttnScratch s;
  return s;
}

// DP (bf16 inputs on CPUs with AVX512_BF16): Q.K and P.V as bf16 dot products with fp32 accumulation
// (vdpbf16ps, twice the fp32 FMA rate): K is read from the cache as it is; P is rounded to bf16 for P.V
// (as SDPA's CPU kernel does for bf16), while l sums the fp32 P; V is packed in key pairs.
template <typename T, int DV, bool DP>
void attend_task_avx512(const T* q_ptr, const int64_t* q_stride, const T* k_ptr, const T* v_ptr,
                                      int64_t kv_stride_s, const uint32_t* mrow, int64_t W, int64_t N, int64_t G,
                                      int64_t hk, int64_t Hq, int64_t L, float scale, int64_t window, T* out_ptr,
                                      const int64_t* out_stride, float* lse_ptr, AttnScratch& sc) {
  constexpr int D = DV * 16;
  const int64_t R = N * G;
  const float ninf = -std::numeric_limits<float>::infinity();
  sc.q.resize(R * D);
  sc.o.assign(R * D, 0.0f);
  sc.k.resize(kTile * D);
  sc.v.resize(kTile * D);
  sc.m.assign(R, ninf);
  sc.l.assign(R, 0.0f);
  sc.first_key.resize(R);
  if constexpr (DP) {
    sc.qb.resize(R * D);
    sc.vp.resize(kTile / 2 * D);
    sc.kt.resize(D / 2 * kTile);
  }
  // Many rows: Q.K vectorised over keys (K transposed once per tile by gathers, shared by all rows; no
  // reduction per dot product), every dtype (bf16 without DP took the per-row path once and ran at 0.4x
  // SDPA on Ice Lake); with few rows the transposition costs more than it saves.
  const bool transposed = R >= 16 && (!DP || kv_stride_s % 2 == 0) && kv_stride_s < (1 << 24);
  if (!DP && transposed) sc.ktf.resize(D * kTile);
  float* Q = sc.q.data();
  float* O = sc.o.data();
  float* Kf = sc.k.data();
  float* Vf = sc.v.data();
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t kt_stride = kF32 ? kv_stride_s : D;  // row stride of Kt / Vt, the tile's keys
  const float* Kt = Kf;
  const float* Vt = Vf;
  // Rows: r <-> (node r / G, head hk * G + r % G), scaled once; window: each row's first visible key.
  int64_t lo_min = L, lo_max = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / G, h = hk * G + r % G;
    const T* src = q_ptr + n * q_stride[1] + h * q_stride[2];
    if constexpr (DP) {
      std::memcpy(sc.qb.data() + r * D, src, D * sizeof(uint16_t));
    } else {
      for (int dv = 0; dv < DV; ++dv)
        _mm512_storeu_ps(Q + r * D + dv * 16, _mm512_mul_ps(load16(src + dv * 16), _mm512_set1_ps(scale)));
    }
    int64_t bits = 0;
    for (int64_t w = 0; w < W; ++w) bits += __builtin_popcount(mrow[n * W + w]);
    const int64_t fk = window > 0 ? std::clamp<int64_t>(L + (bits - 1) - window + 1, 0, L) : 0;
    sc.first_key[r] = fk;
    lo_min = std::min(lo_min, fk);
    lo_max = std::max(lo_max, fk);
  }
  constexpr int kRows = 4;  // rows whose scores are computed together (transposed Q.K shares each K load)
  alignas(64) float Sb[kRows][kTile];
  for (int64_t t0 = window > 0 ? lo_min : 0; t0 < L + N; t0 += kTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kTile, L + N - t0));
    if constexpr (DP) {
      // V in key pairs: word (i, d) = v[2i][d] (low half) | v[2i+1][d] (high half); a missing key is 0.
      const uint16_t* vb = reinterpret_cast<const uint16_t*>(v_ptr);
      for (int i = 0; i < kTile / 2; ++i) {
        const int j = 2 * i;
        for (int dv = 0; dv < DV; ++dv) {
          const __m512i lo = j < nt ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                          vb + (t0 + j) * kv_stride_s + dv * 16)))
                                    : _mm512_setzero_si512();
          const __m512i hi = j + 1 < nt ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                              vb + (t0 + j + 1) * kv_stride_s + dv * 16)))
                                        : _mm512_setzero_si512();
          _mm512_storeu_si512(sc.vp.data() + i * D + dv * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
      if (transposed) {  // word (w, j) = bf16 pair w of key t0 + j (key 0 past the end: masked below)
        const int32_t* kw = reinterpret_cast<const int32_t*>(k_ptr + t0 * kv_stride_s);
        for (int j0 = 0; j0 < kTile; j0 += 16) {
          alignas(64) int32_t off[16];
          for (int j = 0; j < 16; ++j) off[j] = static_cast<int32_t>((j0 + j < nt ? j0 + j : 0) * (kv_stride_s / 2));
          const __m512i idx = _mm512_load_si512(off);
          for (int w = 0; w < D / 2; ++w)
            _mm512_storeu_si512(sc.kt.data() + w * kTile + j0, _mm512_i32gather_epi32(idx, kw + w, 4));
        }
      }
    } else {
      // fp32 reads K and V in the cache where they are (rows kv_stride_s apart); other dtypes convert the tile
      // into Kf / Vf first (rows D apart). Keys past the tile's end read key 0: their scores are set to -inf.
      if constexpr (!kF32) {
        // The per-row Q.K reads Kf; the transposed one gathers K^T below (bf16 straight from the cache).
        const bool k_rows = !transposed || !std::is_same_v<T, at::BFloat16>;
        for (int j = 0; j < nt; ++j) {
          for (int dv = 0; dv < DV; ++dv) {
            if (k_rows) _mm512_storeu_ps(Kf + j * D + dv * 16, load16(k_ptr + (t0 + j) * kv_stride_s + dv * 16));
            _mm512_storeu_ps(Vf + j * D + dv * 16, load16(v_ptr + (t0 + j) * kv_stride_s + dv * 16));
          }
        }
        Kt = Kf;
        Vt = Vf;
      } else {
        Kt = reinterpret_cast<const float*>(k_ptr) + t0 * kv_stride_s;
        Vt = reinterpret_cast<const float*>(v_ptr) + t0 * kv_stride_s;
      }
      if (transposed) {  // K^T by gathers, shared by all rows
        for (int j0 = 0; j0 < kTile; j0 += 16) {
          alignas(64) int32_t off[16];
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            // bf16 from the cache: one 32-bit gather takes elements (2w, 2w + 1) of 16 keys, split into two fp32
            // rows of K^T (a bf16 is the top half of its fp32). Byte offsets: any row stride.
            for (int j = 0; j < 16; ++j)
              off[j] = static_cast<int32_t>((j0 + j < nt ? j0 + j : 0) * kv_stride_s * static_cast<int64_t>(sizeof(T)));
            const __m512i idx = _mm512_load_si512(off);
            const char* kb = reinterpret_cast<const char*>(k_ptr + t0 * kv_stride_s);
            for (int w = 0; w < D / 2; ++w) {
              const __m512i g = _mm512_i32gather_epi32(idx, kb + 4 * w, 1);
              _mm512_storeu_ps(sc.ktf.data() + (2 * w) * kTile + j0, _mm512_castsi512_ps(_mm512_slli_epi32(g, 16)));
              _mm512_storeu_ps(sc.ktf.data() + (2 * w + 1) * kTile + j0,
                               _mm512_castsi512_ps(_mm512_and_si512(g, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
            }
          } else {  // fp32 from the cache, fp16 from its converted tile
            for (int j = 0; j < 16; ++j) off[j] = static_cast<int32_t>((j0 + j < nt ? j0 + j : 0) * kt_stride);
            const __m512i idx = _mm512_load_si512(off);
            for (int d = 0; d < D; ++d)
              _mm512_storeu_ps(sc.ktf.data() + d * kTile + j0, _mm512_i32gather_ps(idx, Kt + d, 4));
          }
        }
      }
    }
    for (int64_t r0 = 0; r0 < R; r0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, R - r0));
      float corr_b[kRows];  // each row's rescale of its accumulator for this tile
      if (transposed) {
        if constexpr (DP) {
          __m512 acc[kRows][kTile / 16];
          for (int i = 0; i < kRows; ++i)
            for (int c = 0; c < kTile / 16; ++c) acc[i][c] = _mm512_setzero_ps();
          const uint32_t* qw = reinterpret_cast<const uint32_t*>(sc.qb.data() + r0 * D);
          for (int w = 0; w < D / 2; ++w) {
            __m512bh kv[kTile / 16];
            for (int c = 0; c < kTile / 16; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(sc.kt.data() + w * kTile + c * 16);
            for (int i = 0; i < kRows; ++i) {
              if (i >= rows) break;
              const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[i * (D / 2) + w]));
              for (int c = 0; c < kTile / 16; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], kv[c], qb);
            }
          }
          for (int i = 0; i < rows; ++i)
            for (int c = 0; c < kTile / 16; ++c) _mm512_store_ps(Sb[i] + c * 16, _mm512_mul_ps(acc[i][c], _mm512_set1_ps(scale)));
        } else {
          __m512 acc[kRows][kTile / 16];
          for (int i = 0; i < kRows; ++i)
            for (int c = 0; c < kTile / 16; ++c) acc[i][c] = _mm512_setzero_ps();
          for (int d = 0; d < D; ++d) {
            __m512 kv[kTile / 16];
            for (int c = 0; c < kTile / 16; ++c) kv[c] = _mm512_loadu_ps(sc.ktf.data() + d * kTile + c * 16);
            for (int i = 0; i < kRows; ++i) {
              if (i >= rows) break;
              const __m512 qd = _mm512_set1_ps(Q[(r0 + i) * D + d]);  // (q already scaled)
              for (int c = 0; c < kTile / 16; ++c) acc[i][c] = _mm512_fmadd_ps(kv[c], qd, acc[i][c]);
            }
          }
          for (int i = 0; i < rows; ++i)
            for (int c = 0; c < kTile / 16; ++c) _mm512_store_ps(Sb[i] + c * 16, acc[i][c]);
        }
      }
      for (int64_t r = r0; r < r0 + rows; ++r) {
        float* S = Sb[r - r0];
        if (!transposed) {  // (else the scores of this block of rows were computed above)
          if constexpr (DP) {
            // D / 32 dot-product instructions per key (32 bf16 each); keys past the tile's end read key 0
            // (any finite row: their scores are set to -inf below).
            constexpr int DW = D / 32;
            __m512bh qv[DW];
            for (int w = 0; w < DW; ++w) qv[w] = (__m512bh)_mm512_loadu_si512(sc.qb.data() + r * D + w * 32);
            const uint16_t* kb = reinterpret_cast<const uint16_t*>(k_ptr);
            for (int j0 = 0; j0 < kTile; j0 += 16) {
              __m512 acc[16];
              for (int j = 0; j < 16; ++j) {
                const uint16_t* kj = kb + (t0 + (j0 + j < nt ? j0 + j : 0)) * kv_stride_s;
                __m512 a = _mm512_setzero_ps();
                for (int w = 0; w < DW; ++w) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kj + w * 32), qv[w]);
                acc[j] = a;
              }
              _mm512_store_ps(S + j0, _mm512_mul_ps(transpose_add16(acc), _mm512_set1_ps(scale)));
            }
          } else {
            const float* qr = Q + r * D;
            __m512 qv[DV];
            for (int dv = 0; dv < DV; ++dv) qv[dv] = _mm512_loadu_ps(qr + dv * 16);
            for (int j0 = 0; j0 < kTile; j0 += 16) {
              __m512 acc[16];
              for (int j = 0; j < 16; ++j) {
                const float* kj = Kt + (j0 + j < nt ? j0 + j : 0) * kt_stride;
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(kj), qv[0]);
                for (int dv = 1; dv < DV; ++dv) a = _mm512_fmadd_ps(_mm512_loadu_ps(kj + dv * 16), qv[dv], a);
                acc[j] = a;
              }
              _mm512_store_ps(S + j0, transpose_add16(acc));
            }
          }
        }
        for (int j = nt; j < kTile; ++j) S[j] = ninf;
        const int64_t n = r / G;
        if (t0 + nt > L) {  // tree keys: the row's mask bits (masked_fill, so a hidden NaN key never reaches it)
          for (int64_t j = std::max<int64_t>(t0, L); j < t0 + nt; ++j) {
            const int64_t c = j - L;
            if (!((mrow[n * W + c / 32] >> (c % 32)) & 1u)) S[j - t0] = ninf;
          }
        }
        if (window > 0 && t0 < sc.first_key[r]) {  // prefix keys older than the row's window
          for (int64_t j = t0; j < std::min<int64_t>(t0 + nt, sc.first_key[r]); ++j) S[j - t0] = ninf;
        }
        __m512 mx = _mm512_set1_ps(ninf);
        for (int j0 = 0; j0 < kTile; j0 += 16) mx = _mm512_max_ps(_mm512_load_ps(S + j0), mx);  // NaN ignored here
        const float m_old = sc.m[r];
        const float m_new = std::max(m_old, _mm512_reduce_max_ps(mx));
        const float shift = m_new == ninf ? 0.0f : m_new;  // nothing visible yet: exp gives 0, not NaN
        const float corr = std::exp(m_old - shift);
        sc.m[r] = m_new;
        __m512 lsum = _mm512_setzero_ps();
        for (int j0 = 0; j0 < kTile; j0 += 16) {
          const __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(S + j0), _mm512_set1_ps(shift)));  // NaN stays NaN
          _mm512_store_ps(S + j0, p);
          lsum = _mm512_add_ps(lsum, p);
        }
        sc.l[r] = sc.l[r] * corr + _mm512_reduce_add_ps(lsum);
        corr_b[r - r0] = corr;
        if constexpr (DP) {
          float* orow = O + r * D;
          __m512 ov[DV];
          const __m512 c = _mm512_set1_ps(corr);
          for (int dv = 0; dv < DV; ++dv) ov[dv] = _mm512_mul_ps(_mm512_loadu_ps(orow + dv * 16), c);
          alignas(64) uint16_t pb[kTile];  // P in bf16, read as words: pair i = pb[2i] | pb[2i+1] << 16
          for (int j0 = 0; j0 < kTile; j0 += 16)
            _mm256_store_si256(reinterpret_cast<__m256i*>(pb + j0), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(S + j0)));
          const uint32_t* pw = reinterpret_cast<const uint32_t*>(pb);
          for (int i = 0; i < (nt + 1) / 2; ++i) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pw[i]));
            const uint32_t* vi = sc.vp.data() + i * D;
            for (int dv = 0; dv < DV; ++dv)
              ov[dv] = _mm512_dpbf16_ps(ov[dv], (__m512bh)_mm512_loadu_si512(vi + dv * 16), p);
          }
          for (int dv = 0; dv < DV; ++dv) _mm512_storeu_ps(orow + dv * 16, ov[dv]);
        }
      }
      if constexpr (!DP) {
        // P.V of the block's rows at once, DH vectors of the head dim at a time (kRows x DH accumulators, as
        // Q.K above): each V vector is loaded once per block instead of once per row. One row at a time was
        // bound by those loads (Ice Lake, LLaVA N60 P1024 fp32: P.V 5 of 10 ms; this is 13-25% faster
        // overall, the same sums in the same order).
        constexpr int DH = DV % 4 == 0 ? 4 : (DV % 2 == 0 ? 2 : 1);
        for (int i = rows; i < kRows; ++i) std::fill_n(Sb[i], kTile, 0.0f);  // rows past R: computed, not stored
        for (int d0 = 0; d0 < DV; d0 += DH) {
          __m512 acc[kRows][DH];
          for (int i = 0; i < kRows; ++i) {
            const __m512 c = _mm512_set1_ps(i < rows ? corr_b[i] : 0.0f);
            for (int e = 0; e < DH; ++e)
              acc[i][e] = i < rows ? _mm512_mul_ps(_mm512_loadu_ps(O + (r0 + i) * D + (d0 + e) * 16), c)
                                   : _mm512_setzero_ps();
          }
          for (int j = 0; j < nt; ++j) {
            const float* vj = Vt + j * kt_stride + d0 * 16;
            __m512 vv[DH];
            for (int e = 0; e < DH; ++e) vv[e] = _mm512_loadu_ps(vj + e * 16);
            for (int i = 0; i < kRows; ++i) {
              const __m512 w = _mm512_set1_ps(Sb[i][j]);
              for (int e = 0; e < DH; ++e) acc[i][e] = _mm512_fmadd_ps(w, vv[e], acc[i][e]);
            }
          }
          for (int i = 0; i < rows; ++i)
            for (int e = 0; e < DH; ++e) _mm512_storeu_ps(O + (r0 + i) * D + (d0 + e) * 16, acc[i][e]);
        }
      }
    }
  }
  // A row that sees nothing (or a NaN) has l = 0 (or NaN): it gets 0 and lse -inf, never 0/0.
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / G, h = hk * G + r % G;
    T* dst = out_ptr + n * out_stride[1] + h * out_stride[2];
    const float l = sc.l[r];
    const bool seen = l > 0.0f;
    const float inv = seen ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(seen ? O[r * D + d] * inv : 0.0f);
    if (lse_ptr) lse_ptr[n * Hq + h] = seen ? sc.m[r] + std::log(l) : ninf;  // lse: (N, Hq) of this batch row
  }
}

template <typename T, int DV, bool DP>
void tree_attention_avx512(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cache_lens, const at::Tensor& tree_mask, float scale, int64_t window,
                           at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv, W = tree_mask.size(2);
  const int64_t mask_bstride = tree_mask.size(0) == 1 ? 0 : N * W;
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(tree_mask.data_ptr<int32_t>());
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.numel() > 0 ? lse.data_ptr<float>() : nullptr;
  const int64_t qs[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  // k/v: (B, Hkv, S_max, D), head_dim contiguous; the same strides for K and V were checked.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    AttnScratch& sc = attn_scratch();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Hkv, hk = t % Hkv;
      attend_task_avx512<T, DV, DP>(qp + b * qs[0], qs, kp + b * k_cache.stride(0) + hk * k_cache.stride(1),
                                vp + b * v_cache.stride(0) + hk * v_cache.stride(1), k_cache.stride(2),
                                mask + b * mask_bstride, W, N, G, hk, Hq, lens[b], scale, window, op + b * os[0], os,
                                lp ? lp + b * N * Hq : nullptr, sc);
    }
  });
}

#pragma GCC pop_options

inline bool cpu_has_avx512_bf16() {
  static const bool yes = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// True when the AVX-512 kernel ran (x86 with AVX-512, head dim 64 / 80 / 96 / 128, K and V alike strided).
bool try_tree_attention_avx512(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cache_lens, const at::Tensor& tree_mask, float scale, int64_t window,
                               at::Tensor& out, at::Tensor& lse) {
  if (!cpu_has_avx512() || k_cache.strides() != v_cache.strides()) return false;
  bool done = false;
  dispatch_float(q.scalar_type(), "tree_attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const bool dp = std::is_same_v<T, at::BFloat16> && cpu_has_avx512_bf16();
    const auto run = [&](auto dv_tag) {
      constexpr int DV = decltype(dv_tag)::value;
      if constexpr (std::is_same_v<T, at::BFloat16> && DV % 2 == 0) {  // DP takes 32 bf16 per instruction
        if (dp) {
          tree_attention_avx512<T, DV, true>(q, k_cache, v_cache, cache_lens, tree_mask, scale, window, out, lse);
          return;
        }
      }
      tree_attention_avx512<T, DV, false>(q, k_cache, v_cache, cache_lens, tree_mask, scale, window, out, lse);
    };
    done = true;
    switch (q.size(3)) {
      case 64: run(std::integral_constant<int, 4>{}); break;
      case 80: run(std::integral_constant<int, 5>{}); break;
      case 96: run(std::integral_constant<int, 6>{}); break;
      case 128: run(std::integral_constant<int, 8>{}); break;
      default: done = false;
    }
  });
  return done;
}
#endif

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                      const at::Tensor& tree_mask, double scale, bool return_lse,
                                                      int64_t window) {
  check_tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, window);
  check_tree_attention_values(q, k_cache, cache_lens);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor lse = return_lse ? at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
#ifdef VISPEC_HAVE_AVX512
  if (try_tree_attention_avx512(q, k_cache, v_cache, cache_lens, tree_mask, static_cast<float>(scale), window, out, lse))
    return {out, lse};
#endif
  tree_attention_kernel(q, k_cache, v_cache, cache_lens, tree_mask, static_cast<float>(scale), window, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace cpu
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CPU, m) { m.impl("tree_attention", &vispec::cpu::tree_attention_cpu); }
