// Tree attention for speculative decoding: the SIMT kernel (flash-decoding style, fp32 math), the split
// combine, and the dispatch. bf16 / fp16 at head dims 64-128 with aligned K/V run on tensor cores instead
// (tree_attention_tc.cu, same contract and split workspace); the SIMT kernel serves fp32, head dim 256,
// unaligned caches, pre-sm_80 builds, and VISPEC_TREE_ATTENTION_KERNEL=simt.
//
// Query node i of batch row b attends to every prefix position 0..cache_lens[b]-1
// and to tree position cache_lens[b] + j iff bit j of tree_mask[b or 0, i] is set.
// With a sliding window W (p.window > 0) node i, at position cache_lens[b] + depth_i
// (depth_i = bits in its mask row - 1), sees prefix keys from that position - W + 1 on.
//
// Work decomposition (kernel 1, tree_attention_kernel):
//   one block per (b, kv head, split, row tile). The "rows" of a (b, kv head) are
//   the N * G queries (G = Hq / Hkv) that read that kv head, so every K/V element
//   a block stages in shared memory serves all of them. A row tile holds up to
//   kMaxWarps * kRowsPerWarp rows (one tile in the common case N * G <= 32).
//   Splits partition the prefix [0, cache_lens[b]) into equal kTK-aligned ranges
//   (computed on the device from cache_lens[b], so short rows stay balanced); the
//   last split additionally owns the tree keys, the only keys that need the mask.
//   Per key tile (kTK = 32 keys): K and V are staged as fp32 in shared memory;
//   lane j of a warp computes the scores of key j for the warp's 8 rows, the warp
//   updates the online softmax (log2 domain), writes the probabilities to shared
//   memory and then every lane accumulates P.V for its output dims (lane + 32 i).
// Kernel 2 (tree_attention_combine_kernel, only when num_splits > 1): one warp
//   per output row merges the per-split normalised partials by log-sum-exp.
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "tree_attention_tc.cuh"
#include "../include/vispec/launchers.h"

namespace vispec {
namespace cuda {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int kTK = 32;            // keys per shared-memory tile: one per lane when scoring
constexpr int kRowsPerWarp = 8;    // query rows per warp: K/V smem reads are shared by 8 rows
constexpr int kMaxWarps = 4;       // warps per block, so at most 32 query rows per block
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 256;
constexpr size_t kSmemCap = 96 * 1024;  // <= the 99 KB opt-in limit of sm_86/sm_89, so every sm_80+ GPU can launch
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared memory (floats): q (rows, D) | K (kTK, D + 4) | V (kTK, D) | P (rows, kTK).
// D is a multiple of 4 for every supported head dim, so every region starts on a
// 16-byte boundary and float4 accesses are aligned.
size_t smem_bytes(int rows, int64_t head_dim) {
  const size_t floats = static_cast<size_t>(rows) * head_dim + static_cast<size_t>(kTK) * (head_dim + 4) +
                        static_cast<size_t>(kTK) * head_dim + static_cast<size_t>(rows) * kTK;
  return floats * sizeof(float);
}

struct LaunchShape {
  int warps;       // warps per block
  int rows;        // query rows per block = warps * kRowsPerWarp
  int row_tiles;   // ceil(N * G / rows)
};

LaunchShape launch_shape(const TreeAttentionParams& p) {
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t rows_total = p.n_tree * group;  // queries sharing one kv head
  int64_t warps = (rows_total + kRowsPerWarp - 1) / kRowsPerWarp;
  if (warps > kMaxWarps) warps = kMaxWarps;
  if (warps < 1) warps = 1;
  while (warps > 1 && smem_bytes(static_cast<int>(warps) * kRowsPerWarp, p.head_dim) > kSmemCap) --warps;
  LaunchShape s;
  s.warps = static_cast<int>(warps);
  s.rows = s.warps * kRowsPerWarp;
  s.row_tiles = static_cast<int>((rows_total + s.rows - 1) / s.rows);
  return s;
}

bool params_ok(const TreeAttentionParams& p) {
  return p.batch > 0 && p.n_tree > 0 && p.num_q_heads > 0 && p.num_kv_heads > 0 &&
         p.num_q_heads % p.num_kv_heads == 0 && tree_attention_supports_head_dim(p.head_dim) &&
         p.max_seq > 0;
}

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * 32)
    tree_attention_kernel(const TreeAttentionParams p, int num_splits, int row_tiles, bool vec_kv,
                          float* __restrict__ ws_out, float* __restrict__ ws_lse) {
  constexpr int kDPL = (D + 31) / 32;  // output dims per lane: lane + 32 * i
  constexpr int kKS = D + 4;           // padded K row (floats): the 32 lanes' float4 reads of 32
                                       // different rows at one column hit distinct bank groups
  constexpr int kVec = detail::VecTraits<T>::kElems;
  constexpr int kVPR = D / kVec;       // 16-byte vectors per K/V row (D * sizeof(T) % 16 == 0)

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rows_pb = static_cast<int>(blockDim.x >> 5) * kRowsPerWarp;

  const detail::TreeBlock blk = detail::tree_block(blockIdx.x, row_tiles, num_splits, p.num_kv_heads);
  const int tile = blk.tile;
  const int split = blk.split;
  const int64_t kvh = blk.kvh;
  const int64_t b = blk.b;

  const int64_t N = p.n_tree;
  const int64_t Hq = p.num_q_heads;
  const int64_t G = Hq / p.num_kv_heads;
  const int64_t R = N * G;  // query rows of this (b, kv head): row r is node r / G, head kvh * G + r % G
  const int64_t S = p.max_seq;
  const int64_t row0 = static_cast<int64_t>(tile) * rows_pb;  // first row of this block

  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);  // (rows_pb, D) q * scale * log2(e)
  float* ks = qs + rows_pb * D;                 // (kTK, kKS) keys of the current tile
  float* vs = ks + kTK * kKS;                   // (kTK, D) values of the current tile
  float* ps = vs + kTK * D;                     // (rows_pb, kTK) softmax numerators of the tile

  // Prefix length, clamped so that every cache position touched lies in [0, S).
  int64_t cl = p.cache_lens[b];  // cache_lens: (B,)
  cl = cl < 0 ? 0 : (cl > S ? S : cl);

  // ---- q tile -> shared memory (pre-scaled so scores come out in log2 units) ----
  {
    const T* q = static_cast<const T*>(p.q);  // q: (B, N, Hq, D) with strides
    const float qscale = p.scale * kLog2e;
    for (int idx = threadIdx.x; idx < rows_pb * D; idx += blockDim.x) {
      const int r = idx / D;
      const int d = idx - r * D;
      const int64_t rg = row0 + r;
      float v = 0.0f;  // rows past R get q = 0: finite scores, never written out
      if (rg < R) {
        const int64_t node = rg / G;
        const int64_t h = kvh * G + (rg - node * G);
        v = to_float(q[b * p.q_stride_b + node * p.q_stride_n + h * p.q_stride_h + d]) * qscale;
      }
      qs[idx] = v;
    }
  }

  // ---- this split's prefix range [pstart, pend) ----
  const detail::KeyRange keys = detail::split_prefix(cl, split, num_splits, kTK);
  const int64_t pstart = keys.start;
  const int64_t pend = keys.end;
  const int64_t n_prefix_tiles = pend > pstart ? (pend - pstart + kTK - 1) / kTK : 0;
  const int64_t n_tree_tiles = (split == num_splits - 1) ? (N + kTK - 1) / kTK : 0;

  // ---- per-row state of this warp's rows (m in log2 units, l per lane) ----
  float m[kRowsPerWarp];
  float l[kRowsPerWarp];
  float acc[kRowsPerWarp][kDPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDPL; ++i) acc[r][i] = 0.0f;
  }
  const int32_t* mask_b = p.tree_mask + b * p.mask_batch_stride;  // tree_mask: (Bm, N, W), batch stride 0 when shared
  // Sliding window: first visible prefix key of each of this warp's rows (its node's depth from the mask).
  int64_t first_key[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    first_key[r] = 0;
    const int64_t rg = row0 + warp * kRowsPerWarp + r;
    if (p.window > 0 && rg < R) {  // warp-uniform
      int bits = 0;
      for (int64_t w = lane; w < p.mask_words; w += 32) bits += __popc(static_cast<uint32_t>(mask_b[(rg / G) * p.mask_words + w]));
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) bits += __shfl_xor_sync(0xffffffffu, bits, off);
      const int64_t fk = cl + (bits - 1) - p.window + 1;
      first_key[r] = fk < 0 ? 0 : (fk > cl ? cl : fk);
    }
  }

  const T* kbase = static_cast<const T*>(p.k_cache) + b * p.k_stride_b + kvh * p.k_stride_h;  // (S, D) slice
  const T* vbase = static_cast<const T*>(p.v_cache) + b * p.v_stride_b + kvh * p.v_stride_h;  // (S, D) slice

  for (int64_t ti = 0; ti < n_prefix_tiles + n_tree_tiles; ++ti) {
    const bool is_tree = ti >= n_prefix_tiles;
    int64_t start;   // cache position of key 0 of the tile
    int nk;          // keys in the tile
    int64_t word = 0;  // tree tiles: mask word index (tile tt covers nodes 32 tt .. 32 tt + 31)
    if (!is_tree) {
      start = pstart + ti * kTK;
      const int64_t left = pend - start;
      nk = static_cast<int>(left < kTK ? left : kTK);
    } else {
      word = ti - n_prefix_tiles;
      start = cl + word * kTK;
      int64_t lim = N - word * kTK;               // tree nodes left
      if (S - start < lim) lim = S - start;       // never past the end of the cache
      nk = static_cast<int>(lim < 0 ? 0 : (lim < kTK ? lim : kTK));
    }
    if (nk <= 0) continue;  // block-uniform, so skipping the barriers below is safe

    __syncthreads();  // everyone is done with the previous tile's K, V and P
    // ---- K/V tile -> shared memory as fp32; rows >= nk are zeroed so that no stale
    // (possibly non-finite) value can meet a zero probability (0 * inf = NaN) ----
    if (vec_kv) {
      for (int idx = threadIdx.x; idx < kTK * kVPR; idx += blockDim.x) {
        const int key = idx / kVPR;
        const int c = idx - key * kVPR;
        float kf[kVec];
        float vf[kVec];
        if (key < nk) {
          const int64_t pos = start + key;  // < S by construction of nk
          const uint4 kraw = *reinterpret_cast<const uint4*>(kbase + pos * p.k_stride_s + c * kVec);
          const uint4 vraw = *reinterpret_cast<const uint4*>(vbase + pos * p.v_stride_s + c * kVec);
          detail::unpack16(kraw, kf, T());
          detail::unpack16(vraw, vf, T());
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) kf[e] = vf[e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          *reinterpret_cast<float4*>(ks + key * kKS + c * kVec + e) = make_float4(kf[e], kf[e + 1], kf[e + 2], kf[e + 3]);
          *reinterpret_cast<float4*>(vs + key * D + c * kVec + e) = make_float4(vf[e], vf[e + 1], vf[e + 2], vf[e + 3]);
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < kTK * D; idx += blockDim.x) {
        const int key = idx / D;
        const int d = idx - key * D;
        float kf = 0.0f;
        float vf = 0.0f;
        if (key < nk) {
          const int64_t pos = start + key;
          kf = to_float(kbase[pos * p.k_stride_s + d]);
          vf = to_float(vbase[pos * p.v_stride_s + d]);
        }
        ks[key * kKS + d] = kf;
        vs[key * D + d] = vf;
      }
    }
    __syncthreads();

    // ---- scores: lane = key, 8 rows per warp; q reads are warp broadcasts ----
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.0f;
    {
      const float4* krow = reinterpret_cast<const float4*>(ks + lane * kKS);
      const float* qw = qs + warp * kRowsPerWarp * D;
#pragma unroll 4
      for (int c = 0; c < D / 4; ++c) {
        const float4 kv = krow[c];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float4 qv = reinterpret_cast<const float4*>(qw + r * D)[c];
          s[r] = fmaf(qv.x, kv.x, s[r]);
          s[r] = fmaf(qv.y, kv.y, s[r]);
          s[r] = fmaf(qv.z, kv.z, s[r]);
          s[r] = fmaf(qv.w, kv.w, s[r]);
        }
      }
    }

    // ---- online softmax update (all branches below are warp-uniform) ----
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      bool visible = lane < nk;
      if (!is_tree && p.window > 0) {
        visible = visible && (start + lane >= first_key[r]);  // older than this row's window
      } else if (is_tree) {
        // Prefix keys need no mask; tree key lane of this tile is node 32 * word + lane.
        const int64_t rg = row0 + warp * kRowsPerWarp + r;
        uint32_t bits = 0;  // rows past R (no node) and words past W see no tree key
        if (rg < R && word < p.mask_words) bits = static_cast<uint32_t>(mask_b[(rg / G) * p.mask_words + word]);
        visible = visible && ((bits >> lane) & 1u);
      }
      const float sc = visible ? s[r] : -INFINITY;
      // A visible NaN score poisons the row (output 0, lse -inf, as on the CPU) on every split count:
      // fmaxf would skip it while the running max is still -inf.
      const bool nan_seen = __any_sync(0xffffffffu, isnan(sc));
      const float m_new = fmaxf(m[r], detail::warp_max(sc));
      float alpha = 1.0f;
      float pj = 0.0f;
      if (m_new != -INFINITY) {  // else nothing visible so far: state stays (m=-inf, l=0, acc=0)
        alpha = exp2f(m[r] - m_new);  // m[r] = -inf -> 0, harmless since l = acc = 0
        pj = exp2f(sc - m_new);       // invisible -> 0
      }
      m[r] = m_new;
      l[r] = nan_seen ? __int_as_float(0x7fc00000) : l[r] * alpha + pj;  // per-lane partial sum, reduced at the end
#pragma unroll
      for (int i = 0; i < kDPL; ++i) acc[r][i] *= alpha;
      ps[(warp * kRowsPerWarp + r) * kTK + lane] = pj;
    }
    __syncwarp();  // P of this warp's rows is written by the warp itself

    // ---- acc += P . V: lane owns dims lane + 32 i (conflict-free row reads) ----
    const int nk4 = (nk + 3) & ~3;  // rows nk..nk4-1 are zero in V and P
    for (int k = 0; k < nk4; k += 4) {
      float4 pr[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        pr[r] = *reinterpret_cast<const float4*>(ps + (warp * kRowsPerWarp + r) * kTK + k);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const float* vrow = vs + (k + kk) * D;
#pragma unroll
        for (int i = 0; i < kDPL; ++i) {
          const int d = lane + 32 * i;
          const float v = (d < D) ? vrow[d] : 0.0f;  // D = 80 / 96: the last slot is partial
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const float pk = kk == 0 ? pr[r].x : (kk == 1 ? pr[r].y : (kk == 2 ? pr[r].z : pr[r].w));
            acc[r][i] = fmaf(pk, v, acc[r][i]);
          }
        }
      }
    }
  }

  // ---- finalize: normalised output (or partial) and log-sum-exp ----
  const int64_t total_rows = p.batch * N * Hq;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const float lsum = detail::warp_sum(l[r]);
    const int64_t rg = row0 + warp * kRowsPerWarp + r;
    if (rg >= R) continue;  // warp-uniform
    const int64_t node = rg / G;
    const int64_t h = kvh * G + (rg - node * G);
    const int64_t orow = (b * N + node) * Hq + h;  // row of out (B, N, Hq, D) and lse (B, N, Hq)
    // No visible key (or a NaN sum): output 0 and lse -inf rather than 0/0. With a
    // NaN sum acc may hold NaN too (0 * NaN), so the output is zeroed explicitly, as
    // the CPU op does (where(l > 0, acc / l, 0)).
    const bool any = lsum > 0.0f;
    const float inv = any ? 1.0f / lsum : 0.0f;
    const float lse2 = any ? m[r] + log2f(lsum) : -INFINITY;
    if (num_splits == 1) {
      T* o = static_cast<T*>(p.out) + orow * D;  // out: (B, N, Hq, D) contiguous
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = from_float<T>(any ? acc[r][i] * inv : 0.0f);
      }
      if (lane == 0 && p.lse != nullptr) p.lse[orow] = lse2 * kLn2;
    } else {
      float* o = ws_out + (static_cast<int64_t>(split) * total_rows + orow) * D;  // (splits, rows, D)
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = any ? acc[r][i] * inv : 0.0f;
      }
      // A NaN sum is passed on as a NaN lse so that the combine zeroes the whole row
      // (as the unsplit path and the CPU op do) instead of dropping this split.
      if (lane == 0) ws_lse[static_cast<int64_t>(split) * total_rows + orow] = isnan(lsum) ? lsum : lse2;  // (splits, rows), log2 units
    }
  }
}

// One warp per output row: out = sum_s 2^(lse_s - lse) * o_s with lse = log2 sum_s 2^lse_s.
template <typename T>
__global__ void __launch_bounds__(128)
    tree_attention_combine_kernel(const float* __restrict__ ws_out, const float* __restrict__ ws_lse,
                                  T* __restrict__ out, float* __restrict__ lse, int64_t total_rows,
                                  int num_splits, int head_dim) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= total_rows) return;  // warp-uniform
  float mx = -INFINITY;
  bool nan = false;
  for (int s = 0; s < num_splits; ++s) {
    const float v = ws_lse[s * total_rows + row];  // ws_lse: (splits, rows)
    nan = nan || isnan(v);
    mx = fmaxf(mx, v);
  }
  T* o = out + row * head_dim;  // out: (B * N * Hq, D)
  if (mx == -INFINITY || nan) {  // no split saw a visible key, or a split's sum was NaN
    for (int d = lane; d < head_dim; d += 32) o[d] = from_float<T>(0.0f);
    if (lane == 0 && lse != nullptr) lse[row] = -INFINITY;
    return;
  }
  float wsum = 0.0f;
  for (int s = 0; s < num_splits; ++s) wsum += exp2f(ws_lse[s * total_rows + row] - mx);  // empty splits add 0
  const float inv = 1.0f / wsum;  // wsum >= 1: the split holding the max contributes 2^0
  for (int d = lane; d < head_dim; d += 32) {
    float a = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(ws_lse[s * total_rows + row] - mx);
      a = fmaf(w, ws_out[(s * total_rows + row) * head_dim + d], a);  // ws_out: (splits, rows, D)
    }
    o[d] = from_float<T>(a * inv);
  }
  if (lane == 0 && lse != nullptr) lse[row] = (mx + log2f(wsum)) * kLn2;
}

// The SIMT main kernel (fp32, head dim 256, unaligned K/V, pre-sm_80 devices).
template <typename T, int D>
cudaError_t launch_simt(const TreeAttentionParams& p, int num_splits, float* ws_out, float* ws_lse, cudaStream_t stream) {
  const LaunchShape shape = launch_shape(p);
  const size_t smem = smem_bytes(shape.rows, D);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(tree_attention_kernel<T, D>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  // 16-byte K/V loads need every row start 16-byte aligned.
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t es = static_cast<int64_t>(sizeof(T));
  const bool vec_kv = aligned(p.k_cache) && aligned(p.v_cache) && (p.k_stride_b * es) % 16 == 0 &&
                      (p.k_stride_h * es) % 16 == 0 && (p.k_stride_s * es) % 16 == 0 &&
                      (p.v_stride_b * es) % 16 == 0 && (p.v_stride_h * es) % 16 == 0 &&
                      (p.v_stride_s * es) % 16 == 0 && (D * es) % 16 == 0;
  const int64_t blocks = p.batch * p.num_kv_heads * num_splits * shape.row_tiles;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  tree_attention_kernel<T, D><<<static_cast<unsigned>(blocks), shape.warps * 32, smem, stream>>>(
      p, num_splits, shape.row_tiles, vec_kv, ws_out, ws_lse);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_d(const TreeAttentionParams& p, int num_splits, cudaStream_t stream) {
  const int64_t total_rows = p.batch * p.n_tree * p.num_q_heads;
  float* ws_out = nullptr;
  float* ws_lse = nullptr;
  if (num_splits > 1) {
    ws_out = static_cast<float*>(p.workspace);                        // (splits, rows, D)
    ws_lse = ws_out + static_cast<int64_t>(num_splits) * total_rows * D;  // (splits, rows)
  }
  // bf16 / fp16 at D <= 128 with aligned K/V on sm_80+: tensor cores (tree_attention_tc.cu).
  const cudaError_t e = tc::eligible(p) ? tc::launch(p, num_splits, ws_out, ws_lse, stream)
                                        : launch_simt<T, D>(p, num_splits, ws_out, ws_lse, stream);
  if (e != cudaSuccess || num_splits == 1) return e;

  const int64_t cblocks = (total_rows + 3) / 4;  // 4 warps (rows) per block
  if (cblocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  tree_attention_combine_kernel<T><<<static_cast<unsigned>(cblocks), 128, 0, stream>>>(
      ws_out, ws_lse, static_cast<T*>(p.out), p.lse, total_rows, num_splits, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const TreeAttentionParams& p, int num_splits, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_d<T, 64>(p, num_splits, stream);
    case 80: return launch_d<T, 80>(p, num_splits, stream);
    case 96: return launch_d<T, 96>(p, num_splits, stream);
    case 128: return launch_d<T, 128>(p, num_splits, stream);
    case 256: return launch_d<T, 256>(p, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool tree_attention_supports_head_dim(int64_t head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

int tree_attention_num_splits(const TreeAttentionParams& p, int num_sms) {
  if (!params_ok(p)) return 1;
  if (num_sms < 1) num_sms = 1;
  const int64_t row_tiles = tc::eligible(p) ? tc::row_tiles(p) : launch_shape(p).row_tiles;
  const int64_t base_blocks = p.batch * p.num_kv_heads * row_tiles;
  const int64_t target = 2 * static_cast<int64_t>(num_sms);
  if (base_blocks >= target) return 1;
  int64_t splits = (target + base_blocks - 1) / base_blocks;
  // Split boundaries are kTK- (SIMT) or tc::kKeys-aligned (tensor cores) shares of cache_lens[b] <= S_max - N; keep at
  // least kMinKeysPerSplit keys per split for the longest possible prefix.
  const int64_t max_prefix = p.max_seq - p.n_tree;
  const int64_t by_len = max_prefix > 0 ? max_prefix / kMinKeysPerSplit : 0;
  if (splits > by_len) splits = by_len;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

size_t tree_attention_workspace_bytes(const TreeAttentionParams& p, int num_splits) {
  if (num_splits <= 1 || !params_ok(p)) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.n_tree * p.num_q_heads;
  // partial outputs (splits, rows, D) + partial log2-sum-exp (splits, rows), fp32
  return static_cast<size_t>(num_splits) * rows * (static_cast<size_t>(p.head_dim) + 1) * sizeof(float);
}

cudaError_t tree_attention(const TreeAttentionParams& p, int num_splits, cudaStream_t stream) {
  if (p.batch <= 0 || p.n_tree <= 0 || p.num_q_heads <= 0) return cudaSuccess;  // empty output
  if (!params_ok(p)) return cudaErrorInvalidValue;
  if (num_splits < 1) num_splits = 1;
  if (num_splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_t<float>(p, num_splits, stream);
    case DType::kFloat16: return launch_t<__half>(p, num_splits, stream);
    case DType::kBFloat16: return launch_t<__nv_bfloat16>(p, num_splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace vispec
