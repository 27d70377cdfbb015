// Tree attention on tensor cores (FlashAttention-2 style, mma.sync m16n8k16, bf16 / fp16 in, fp32 accumulate).
//
// Same contract and semantics as the SIMT kernel of tree_attention.cu (see vispec/launchers.h): node i of
// batch row b sees every prefix key 0..cache_lens[b]-1 (from its sliding-window start when p.window > 0)
// and tree key j iff bit j of its mask row is set; a visible NaN score makes the row's output 0 and its
// lse -inf on every split count; a row that sees nothing gets the same.
//
// Work decomposition: one block of 4 warps per (b, kv head, split, 64-row tile). The rows of a (b, kv
// head) are its N * G queries (G = Hq / Hkv, row r = node r / G, head kvh * G + r % G), so each K/V tile
// the block stages serves the whole GQA group; warp w owns rows 16 w .. 16 w + 15 of the tile (the M
// dimension of its mma's). Splits cut the prefix into kKeys-aligned ranges; the last split also owns the
// tree keys, the only tiles that read the mask. Per 64-key tile, double-buffered:
//
//   cp.async   K, V tile (64, D) -> shared memory (rows padded by 16 B: ldmatrix conflict-free), the
//              next tile's copy in flight while this one is computed; keys past the tile's end zero-filled
//   S = Q K^T  Q fragments held in registers for the whole loop (loaded once by ldmatrix), K by ldmatrix
//   softmax    online, log2 domain, per row over the quad of lanes that holds it; P rounded to T
//   O += P V   P reused from the S accumulators as the A operand (the m16n8 C layout is the A layout of
//              m16n8k16 for two adjacent key octets), V by ldmatrix.trans
//
// Registers per thread at D = 128: O 64 fp32, S 32 fp32, Q 32 b32 (ptxas report: benchmarks/results/).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "tree_attention_tc.cuh"

namespace vispec {
namespace cuda {
namespace tc {
namespace {

constexpr int kWarps = kRows / 16;  // one m16 slab of rows per warp
constexpr int kThreads = kWarps * 32;
static_assert(kRows == 16 * kWarps && kRows <= kKeys, "the Q tile is staged in one K tile: kRows <= kKeys rows");
constexpr int kPad = 8;             // elements of padding per smem row: consecutive rows start 16 B apart
                                    // modulo 128 B, so the 8 row addresses of an ldmatrix hit 8 bank groups
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared memory: 2 stages x (K tile, V tile), each (kKeys, D + kPad) elements of T. The Q tile (kRows, D +
// kPad) is staged once, before the loop, in stage 1's K tile (kRows == kKeys), and read into registers
// before stage 1 is first written.
size_t smem_bytes(int64_t head_dim) {
  return static_cast<size_t>(4) * kKeys * static_cast<size_t>(head_dim + kPad) * 2;
}

// ---------------------------------------------------------------------------
// PTX wrappers (sm_80+)
// ---------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, bypassing L1; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#elif defined(__CUDA_ARCH__)
  __trap();  // eligible() never launches this kernel from pre-sm_80 code; fail loudly if it ever does
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices; lanes 8m .. 8m + 7 give the row addresses of matrix m, and lane l receives
// element pair (row l / 4, columns 2 (l % 4), +1) of each matrix (.trans: pair (rows 2 (l % 4), +1; column l / 4)).
// Addresses are 32-bit shared-window addresses: a per-thread base plus a compile-time offset folds into
// the instruction instead of holding one register per (k step, key octet) across the loop.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned row_addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_addr));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], unsigned row_addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_addr));
#endif
}

// d += a (16x16, row) * b (16x8, col): the fragment layouts of the PTX ISA, g = lane / 4, c = lane % 4:
//   a[0] (g, 2c..2c+1)  a[1] (g+8, 2c..)  a[2] (g, 8+2c..)  a[3] (g+8, 8+2c..)     (row, k)
//   b[0] (2c..2c+1, g)  b[1] (8+2c.., g)                                            (k, col)
//   d[0], d[1] (g, 2c), (g, 2c+1)   d[2], d[3] (g+8, 2c), (g+8, 2c+1)              (row, col)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats -> one b32 of two T, lo at the lower address (the lower column of a fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)  // <= 255 registers: no spills on sm_80 / sm_90 (ptxas report)
    tree_attention_tc_kernel(const TreeAttentionParams p, int num_splits, int n_row_tiles, bool q_vec,
                             float* __restrict__ ws_out, float* __restrict__ ws_lse) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16 (k16 steps of Q K^T, n16 steps of P V)");
  constexpr int kStride = D + kPad;      // smem row, elements
  constexpr int kTile = kKeys * kStride; // one K or V tile, elements
  constexpr int kChunks = D / 8;         // 16-byte chunks per row
  constexpr int kDK = D / 16;            // k16 steps of Q K^T
  constexpr int kDN = D / 8;             // n8 tiles of O
  constexpr int kKN = kKeys / 8;         // n8 tiles of S

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // fragment row (and +8)
  const int c = lane & 3;   // fragment column pair

  const detail::TreeBlock blk = detail::tree_block(blockIdx.x, n_row_tiles, num_splits, p.num_kv_heads);
  const int tile = blk.tile;
  const int split = blk.split;
  const int64_t kvh = blk.kvh;
  const int64_t b = blk.b;

  const int64_t N = p.n_tree;
  const int64_t Hq = p.num_q_heads;
  const int64_t G = Hq / p.num_kv_heads;
  const int64_t R = N * G;
  const int64_t S = p.max_seq;
  const int64_t row0 = static_cast<int64_t>(tile) * kRows;

  extern __shared__ uint4 smem_tc[];
  T* const sm = reinterpret_cast<T*>(smem_tc);
  T* const qs = sm + 2 * kTile;  // Q tile, aliases stage 1's K tile until the Q fragments are in registers

  int64_t cl = p.cache_lens[b];  // cache_lens: (B,), clamped so every position touched lies in [0, S)
  cl = cl < 0 ? 0 : (cl > S ? S : cl);

  // This split's prefix range [pstart, pend), then (last split) the tree tiles.
  const detail::KeyRange keys = detail::split_prefix(cl, split, num_splits, kKeys);
  const int64_t pstart = keys.start;
  const int64_t pend = keys.end;
  const int n_prefix_tiles = pend > pstart ? static_cast<int>((pend - pstart + kKeys - 1) / kKeys) : 0;
  const int n_tree_tiles = (split == num_splits - 1) ? static_cast<int>((N + kKeys - 1) / kKeys) : 0;
  const int n_tiles = n_prefix_tiles + n_tree_tiles;

  // Tile ti: first cache position and number of keys (tree tiles never read past S; nk may be 0 only when
  // cache_lens broke its contract, and then nothing is visible).
  const auto tile_start = [&](int ti) -> int64_t {
    return ti < n_prefix_tiles ? pstart + static_cast<int64_t>(ti) * kKeys
                               : cl + static_cast<int64_t>(ti - n_prefix_tiles) * kKeys;
  };
  const auto tile_keys = [&](int ti) -> int {
    const int64_t start = tile_start(ti);
    int64_t lim = ti < n_prefix_tiles ? pend - start : N - static_cast<int64_t>(ti - n_prefix_tiles) * kKeys;
    if (S - start < lim) lim = S - start;
    return static_cast<int>(lim < 0 ? 0 : (lim < kKeys ? lim : kKeys));
  };

  const T* kbase = static_cast<const T*>(p.k_cache) + b * p.k_stride_b + kvh * p.k_stride_h;  // (S, D) slice
  const T* vbase = static_cast<const T*>(p.v_cache) + b * p.v_stride_b + kvh * p.v_stride_h;  // (S, D) slice

  // K and V rows of tile ti -> stage st (kKeys rows x kChunks 16-byte chunks each; past nk: zeros).
  const auto load_tile = [&](int ti, int st) {
    const int64_t start = tile_start(ti);
    const int nk = tile_keys(ti);
    T* ks = sm + (2 * st) * kTile;
    T* vs = ks + kTile;
    for (int idx = threadIdx.x; idx < kKeys * kChunks; idx += kThreads) {
      const int key = idx / kChunks;
      const int ch = idx - key * kChunks;
      const bool in = key < nk;
      const int64_t pos = in ? start + key : 0;
      cp_async16(ks + key * kStride + ch * 8, kbase + pos * p.k_stride_s + ch * 8, in ? 16 : 0);
      cp_async16(vs + key * kStride + ch * 8, vbase + pos * p.v_stride_s + ch * 8, in ? 16 : 0);
    }
    cp_async_commit();
  };

  if (n_tiles > 0) load_tile(0, 0);

  // ---- Q tile -> smem (rows past R: zeros) -> registers, once ----
  {
    const T* q = static_cast<const T*>(p.q);  // q: (B, N, Hq, D) with strides
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks;
      const int ch = idx - r * kChunks;
      const int64_t rg = row0 + r;
      T* dst = qs + r * kStride + ch * 8;
      if (rg < R) {
        const int64_t node = rg / G;
        const int64_t h = kvh * G + (rg - node * G);
        const T* src = q + b * p.q_stride_b + node * p.q_stride_n + h * p.q_stride_h + ch * 8;
        if (q_vec) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dst[e] = src[e];
        }
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
  __syncthreads();
  uint32_t qf[kDK][4];  // A fragments of this warp's 16 rows, one per k16 step
  {
    // Matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3].
    const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = (lane >> 4) * 8;
    const unsigned qaddr = smem_addr(qs + r * kStride + col);
#pragma unroll
    for (int kk = 0; kk < kDK; ++kk) ldmatrix_x4(qf[kk], qaddr + kk * 16 * static_cast<unsigned>(sizeof(T)));
  }
  __syncthreads();  // the Q tile's smem is stage 1's K tile from now on

  // ---- per-row state: this thread holds rows g and g + 8 of the warp's slab (i = 0, 1) ----
  const float qk_scale = p.scale * kLog2e;  // scores in log2 units
  int64_t node_of[2];                        // -1: a padding row past R
  int64_t first_key[2];                      // sliding window: first visible prefix key
  const int32_t* mrow[2];                    // the node's mask row (W words)
  const int32_t* mask_b = p.tree_mask + b * p.mask_batch_stride;  // tree_mask: (Bm, N, W)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t rg = row0 + warp * 16 + g + 8 * i;
    node_of[i] = rg < R ? rg / G : -1;
    mrow[i] = mask_b + (node_of[i] < 0 ? 0 : node_of[i]) * p.mask_words;
    first_key[i] = 0;
    if (p.window > 0 && node_of[i] >= 0) {
      int bits = 0;
      for (int64_t w = 0; w < p.mask_words; ++w) bits += __popc(static_cast<uint32_t>(mrow[i][w]));
      const int64_t fk = cl + (bits - 1) - p.window + 1;
      first_key[i] = fk < 0 ? 0 : (fk > cl ? cl : fk);
    }
  }
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  bool nan_seen[2] = {false, false};
  float o[kDN][4];
#pragma unroll
  for (int j = 0; j < kDN; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  // This lane's ldmatrix row addresses in stage 0; stage 1 is kStageBytes further.
  constexpr unsigned kStageBytes = 2 * kTile * sizeof(T);
  const unsigned k_addr0 = smem_addr(sm + ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8);
  const unsigned v_addr0 = smem_addr(sm + kTile + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8);

  const bool warp_live = row0 + warp * 16 < R;  // some row of this warp's slab is a real query
  for (int ti = 0; ti < n_tiles; ++ti) {
    const int st = ti & 1;
    if (ti + 1 < n_tiles) {
      load_tile(ti + 1, st ^ 1);  // stage st ^ 1 was released by the barrier that ended tile ti - 1
      cp_async_wait<1>();         // tile ti has landed (this thread's copies) ...
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();              // ... and everyone's
    const bool is_tree = ti >= n_prefix_tiles;
    const int64_t start = tile_start(ti);
    const int nk = tile_keys(ti);
    // Every thread of the block meets each barrier at the same instruction (one call site per barrier: a
    // conditional barrier is undefined behaviour that compute-sanitizer's synccheck flags); a warp whose slab
    // holds padding rows only takes part in the loads and the barriers.
    if (warp_live) {
      // ---- S = Q K^T: 16 rows x 64 keys per warp ----
      float s[kKN][4];
#pragma unroll
      for (int j = 0; j < kKN; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
      {
        // Matrices (k_addr0): (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15)
        // of a 16-key pair of octets = b0, b1 of the first octet, b0, b1 of the second.
        const unsigned kaddr = k_addr0 + st * kStageBytes;
#pragma unroll
        for (int kk = 0; kk < kDK; ++kk) {
#pragma unroll
          for (int jp = 0; jp < kKN / 2; ++jp) {
            uint32_t kb[4];
            ldmatrix_x4(kb, kaddr + (jp * 16 * kStride + kk * 16) * static_cast<unsigned>(sizeof(T)));
            mma_16816<T>(s[2 * jp], qf[kk], kb[0], kb[1]);
            mma_16816<T>(s[2 * jp + 1], qf[kk], kb[2], kb[3]);
          }
        }
      }

      // ---- online softmax of rows g (i = 0) and g + 8 (i = 1); a row's 64 scores sit on a quad of lanes ----
      uint32_t pf[kKN][2];  // P as T pairs: pf[j][i] = keys 8j + 2c, +1 of row i
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        uint64_t bits = ~0ull;  // prefix keys need no mask
        if (is_tree) {
          bits = 0;  // padding rows and words past W see no tree key
          const int64_t w0 = 2 * static_cast<int64_t>(ti - n_prefix_tiles);  // 64 keys = mask words w0, w0 + 1
          if (node_of[i] >= 0) {
            if (w0 < p.mask_words) bits |= static_cast<uint32_t>(mrow[i][w0]);
            if (w0 + 1 < p.mask_words) bits |= static_cast<uint64_t>(static_cast<uint32_t>(mrow[i][w0 + 1])) << 32;
          }
        }
        // Keys of the tile before lo are older than the row's sliding window (prefix tiles only).
        const int64_t lo64 = is_tree ? 0 : first_key[i] - start;
        const int lo = lo64 <= 0 ? 0 : (lo64 >= kKeys ? kKeys : static_cast<int>(lo64));
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kKN; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int kl = 8 * j + 2 * c + e;
            const bool vis = kl < nk && kl >= lo && ((bits >> kl) & 1ull);
            const float v = vis ? s[j][2 * i + e] * qk_scale : -INFINITY;
            nan_seen[i] = nan_seen[i] || isnan(v);
            s[j][2 * i + e] = v;
            mx = fmaxf(mx, v);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[i], mx);
        float alpha = 1.0f;
        float sum = 0.0f;
        if (m_new != -INFINITY) {  // quad-uniform; else nothing visible yet and the state stays (-inf, 0, 0)
          alpha = exp2f(m[i] - m_new);  // m[i] = -inf -> 0, harmless: l = o = 0 then
#pragma unroll
          for (int j = 0; j < kKN; ++j) {
            const float p0 = exp2f(s[j][2 * i] - m_new);  // invisible -> 0; a NaN score -> NaN (l turns NaN)
            const float p1 = exp2f(s[j][2 * i + 1] - m_new);
            sum += p0 + p1;
            pf[j][i] = pack2<T>(p0, p1);
          }
        } else {
#pragma unroll
          for (int j = 0; j < kKN; ++j) pf[j][i] = 0u;
        }
        m[i] = m_new;
        l[i] = l[i] * alpha + sum;  // this lane's share of the row sum, reduced over the quad at the end
#pragma unroll
        for (int j = 0; j < kDN; ++j) {
          o[j][2 * i] *= alpha;
          o[j][2 * i + 1] *= alpha;
        }
      }

      // ---- O += P V: A = P for keys 16 kk .. 16 kk + 15 (octets 2 kk, 2 kk + 1), B = V by ldmatrix.trans ----
      {
        // Matrices (v_addr0): (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
        // of a 16 x 16 block = b0, b1 of d octet 2 dn, b0, b1 of d octet 2 dn + 1.
        const unsigned vaddr = v_addr0 + st * kStageBytes;
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk) {
          const uint32_t a[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
#pragma unroll
          for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, vaddr + (kk * 16 * kStride + dn * 16) * static_cast<unsigned>(sizeof(T)));
            mma_16816<T>(o[2 * dn], a, vb[0], vb[1]);
            mma_16816<T>(o[2 * dn + 1], a, vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // stage st is free for tile ti + 2
  }

  // ---- finalize: quad sums, normalised output (or split partial) and log-sum-exp ----
  const int64_t total_rows = p.batch * N * Hq;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lsum = l[i];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    int nan = nan_seen[i] ? 1 : 0;
    nan |= __shfl_xor_sync(0xffffffffu, nan, 1);
    nan |= __shfl_xor_sync(0xffffffffu, nan, 2);
    if (nan) lsum = __int_as_float(0x7fc00000);
    if (node_of[i] < 0) continue;
    const int64_t rg = row0 + warp * 16 + g + 8 * i;
    const int64_t node = node_of[i];
    const int64_t h = kvh * G + (rg - node * G);
    const int64_t orow = (b * N + node) * Hq + h;  // row of out (B, N, Hq, D) and lse (B, N, Hq)
    // Nothing visible or a NaN sum: output 0 and lse -inf (o may hold NaN then: zeroed explicitly).
    const bool any = lsum > 0.0f;
    const float inv = any ? 1.0f / lsum : 0.0f;
    const float lse2 = any ? m[i] + log2f(lsum) : -INFINITY;
    if (num_splits == 1) {
      T* out = static_cast<T*>(p.out) + orow * D;  // out: (B, N, Hq, D) contiguous
#pragma unroll
      for (int j = 0; j < kDN; ++j) {
        const uint32_t v = pack2<T>(any ? o[j][2 * i] * inv : 0.0f, any ? o[j][2 * i + 1] * inv : 0.0f);
        *reinterpret_cast<uint32_t*>(out + 8 * j + 2 * c) = v;
      }
      if (c == 0 && p.lse != nullptr) p.lse[orow] = lse2 * kLn2;
    } else {
      float* out = ws_out + (static_cast<int64_t>(split) * total_rows + orow) * D;  // (splits, rows, D)
#pragma unroll
      for (int j = 0; j < kDN; ++j)
        *reinterpret_cast<float2*>(out + 8 * j + 2 * c) =
            make_float2(any ? o[j][2 * i] * inv : 0.0f, any ? o[j][2 * i + 1] * inv : 0.0f);
      // A NaN sum goes on as a NaN lse: the combine then zeroes the row instead of dropping the split.
      if (c == 0) ws_lse[static_cast<int64_t>(split) * total_rows + orow] = isnan(lsum) ? lsum : lse2;
    }
  }
}

template <typename T, int D>
cudaError_t launch_d(const TreeAttentionParams& p, int num_splits, float* ws_out, float* ws_lse, cudaStream_t stream) {
  const size_t smem = smem_bytes(D);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(tree_attention_tc_kernel<T, D>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  // 16-byte Q loads need 16-byte aligned rows (the fallback reads elements).
  const int64_t es = static_cast<int64_t>(sizeof(T));
  const bool q_vec = reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && (p.q_stride_b * es) % 16 == 0 &&
                     (p.q_stride_n * es) % 16 == 0 && (p.q_stride_h * es) % 16 == 0;
  const int64_t tiles = row_tiles(p);
  const int64_t blocks = p.batch * p.num_kv_heads * num_splits * tiles;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  tree_attention_tc_kernel<T, D><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      p, num_splits, static_cast<int>(tiles), q_vec, ws_out, ws_lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const TreeAttentionParams& p, int num_splits, float* ws_out, float* ws_lse, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_d<T, 64>(p, num_splits, ws_out, ws_lse, stream);
    case 80: return launch_d<T, 80>(p, num_splits, ws_out, ws_lse, stream);
    case 96: return launch_d<T, 96>(p, num_splits, ws_out, ws_lse, stream);
    case 128: return launch_d<T, 128>(p, num_splits, ws_out, ws_lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t kernel_attributes_t(int64_t head_dim, cudaFuncAttributes* attr) {
  switch (head_dim) {
    case 64: return cudaFuncGetAttributes(attr, tree_attention_tc_kernel<T, 64>);
    case 80: return cudaFuncGetAttributes(attr, tree_attention_tc_kernel<T, 80>);
    case 96: return cudaFuncGetAttributes(attr, tree_attention_tc_kernel<T, 96>);
    case 128: return cudaFuncGetAttributes(attr, tree_attention_tc_kernel<T, 128>);
    default: return cudaErrorInvalidValue;
  }
}

// Attributes of the kernel instance p would launch, for the current device (its PTX / SASS versions).
cudaError_t kernel_attributes(const TreeAttentionParams& p, cudaFuncAttributes* attr) {
  return p.dtype == DType::kFloat16 ? kernel_attributes_t<__half>(p.head_dim, attr)
                                    : kernel_attributes_t<__nv_bfloat16>(p.head_dim, attr);
}

// Read on every launch (not cached) so that a test or benchmark can compare both kernels in one process.
bool forced_simt() {
  const char* v = std::getenv("VISPEC_TREE_ATTENTION_KERNEL");
  return v != nullptr && std::strcmp(v, "simt") == 0;
}

}  // namespace

bool eligible(const TreeAttentionParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 80 && p.head_dim != 96 && p.head_dim != 128) return false;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t es = 2;  // bf16 / fp16
  if (!aligned(p.k_cache) || !aligned(p.v_cache)) return false;
  for (const int64_t stride : {p.k_stride_b, p.k_stride_h, p.k_stride_s, p.v_stride_b, p.v_stride_h, p.v_stride_s})
    if ((stride * es) % 16 != 0) return false;
  if (forced_simt()) return false;
  // The kernel's code on this device must come from sm_80+ PTX: a build for older archs only (JIT from
  // compute_75 PTX, say) has no mma / ldmatrix / cp.async in it.
  // The answer is fixed per (device, dtype, head dim): looked up once, not on every launch (the hot path).
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  constexpr int kDevices = 64;
  static std::atomic<signed char> known[kDevices][2][4];  // 0 unknown, 1 yes, -1 no (zero-initialised)
  const int di = p.dtype == DType::kFloat16 ? 0 : 1;
  const int hi = p.head_dim == 64 ? 0 : p.head_dim == 80 ? 1 : p.head_dim == 96 ? 2 : 3;
  if (dev >= 0 && dev < kDevices) {
    const signed char k = known[dev][di][hi].load(std::memory_order_relaxed);
    if (k != 0) return k > 0;
  }
  cudaFuncAttributes attr;
  if (kernel_attributes(p, &attr) != cudaSuccess) {
    cudaGetLastError();  // leave no stale error for the SIMT launch to report
    return false;
  }
  const bool ok = attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
  if (dev >= 0 && dev < kDevices) known[dev][di][hi].store(ok ? 1 : -1, std::memory_order_relaxed);
  return ok;
}

int64_t row_tiles(const TreeAttentionParams& p) {
  const int64_t rows = p.n_tree * (p.num_q_heads / p.num_kv_heads);
  return (rows + kRows - 1) / kRows;
}

cudaError_t launch(const TreeAttentionParams& p, int num_splits, float* ws_out, float* ws_lse, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16: return launch_t<__half>(p, num_splits, ws_out, ws_lse, stream);
    case DType::kBFloat16: return launch_t<__nv_bfloat16>(p, num_splits, ws_out, ws_lse, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace tc
}  // namespace cuda
}  // namespace vispec
