// Verification kernels: greedy tree verification, lossless multi-round rejection
// sampling over a token tree, and chain speculative sampling.
//
// verify_greedy: kernel A (blocks per (b, n) row: several when B * N alone would
//   leave SMs idle) computes the argmax of the target logits with torch.argmax
//   semantics; kernel B (one thread per batch row) merges the splits and walks the tree.
// verify_sampling: kernel 1 (one block per (b, n) node, all in parallel) describes
//   each node's processed distribution by three scalars (max score, kept-key
//   threshold, normaliser Z) and records its 64-token chunk maxima; with top-k the
//   threshold comes from ~k candidate chunks (see node_dist_kernel), otherwise from
//   a 16-way search over the monotone 32-bit key space (15 block-wide counts or
//   masses per pass over the row, at most 8 passes per threshold). Kernel 2 (one
//   block per batch row) walks the tree on those scalars and draws the bonus
//   token from the chunks that hold kept tokens.
// chain_speculative_sampling: one block per batch row; thread 0 runs the
//   accept/reject chain, the block draws the replacement / bonus token.
// Token draws use a chunked block scan: each thread owns a contiguous chunk of
// the vocabulary, a block scan of the chunk sums (double) locates the chunk that
// holds the target and its owner rescans the chunk.
#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "../include/vispec/launchers.h"

namespace vispec {
namespace cuda {
namespace {

using detail::block_allreduce;
using detail::block_row_for_each;
using detail::float_to_key;
using detail::key_to_float;
using detail::pack_key_index;
using detail::to_float;
using detail::unpack_index;
using detail::unpack_key;

// Kernels of kSampleThreads (512) threads set their register budget to 65536 / 512 = 128 with __maxnreg__ where
// nvcc has it (12.4+): under __launch_bounds__(512) (the same cap) ptxas 13 chose on its own to use 40
// registers and spill in the walk and chain kernels.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define VISPEC_SAMPLE_BOUNDS __maxnreg__(128)
#else
#define VISPEC_SAMPLE_BOUNDS __launch_bounds__(512)
#endif

constexpr int kArgmaxThreads = 256;
constexpr int kWalkThreads = 128;
constexpr int kSampleThreads = 512;  // VISPEC_SAMPLE_BOUNDS assumes it
constexpr int kMaxRejected = 1024;  // distinct rejected tokens remembered per node (children of one node)
constexpr int kCuts = 15;           // cut points per search pass: 16-way search, <= 8 passes for 2^32 keys
constexpr int kMaxSearchPasses = 12;
constexpr int kChunk = 64;          // tokens per chunk: chunk maxima bound the top-k threshold from below
constexpr int kMaxCand = 4096;      // top-k candidates (tokens >= the k-th chunk maximum) gathered per node
constexpr int kMaxKept = 2 * kSampleThreads;  // kept tokens sorted per node (two per thread in the scan)

struct SampleSmem {
  unsigned uscratch[32 * (kCuts + 1) + (kCuts + 1)];  // block_sum_array<unsigned, 16> / block_allreduce
  double fscratch[32 * (kCuts + 1) + (kCuts + 1)];    // block_sum_array<double, 16> / block_allreduce (masses)
  unsigned long long u64scratch[32];
  double dscratch[32];
  double incl[kSampleThreads];  // inclusive scan of the per-thread chunk sums
  int rejected[kMaxRejected];   // tokens rejected at the current node
  int n_rejected;
  long long next;               // accepted child, or -1
  long long reject_at;          // chain: index of the first rejection (K if none)
  long long selected;           // draw: smallest index picked by an owner thread
};

// ---------------------------------------------------------------------------
// Greedy
// ---------------------------------------------------------------------------
// torch.argmax order: NaN beats every number (first NaN wins), otherwise the
// largest value, the first index among equal values (-0.0 == +0.0).
__device__ __forceinline__ unsigned long long argmax_entry(float v, int64_t i) {
  const uint32_t key = isnan(v) ? 0xffffffffu : float_to_key(v);
  return pack_key_index(key, i);
}

// Block (row, split) reduces tokens [split * per, (split + 1) * per) of the row, per = the row cut in
// splits equal parts (16-byte aligned when the row is), to a packed (key, index): the largest wins, the
// smallest index among equals. 0 (an empty part) loses to every real entry: a real key is >= key(-inf) > 0
// (NaNs map to the max key).
template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads)
    row_argmax_kernel(const T* __restrict__ logits, int64_t vocab, int64_t splits, int64_t* __restrict__ ws) {
  __shared__ unsigned long long scratch[32];
  const int64_t row = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
  int64_t per = (vocab + splits - 1) / splits;
  per = (per + 7) / 8 * 8;  // a multiple of every 16-byte vector width
  const int64_t v0 = split * per < vocab ? split * per : vocab;
  const int64_t v1 = v0 + per < vocab ? v0 + per : vocab;
  const T* x = logits + row * vocab + v0;  // logits: (B * N, V)
  unsigned long long best = 0;
  block_row_for_each(x, v1 - v0, [&](int64_t i, float v) {
    const unsigned long long e = argmax_entry(v, v0 + i);
    best = e > best ? e : best;
  });
  best = block_allreduce(best, detail::MaxOp(), scratch);
  if (threadIdx.x == 0) ws[blockIdx.x] = static_cast<int64_t>(best);  // ws: (B * N, splits)
}

// argmax of node n of batch row b from its splits' packed maxima.
__device__ __forceinline__ int64_t node_argmax(const VerifyGreedyParams& p, int64_t b, int64_t n) {
  const int64_t* w = p.argmax_ws + (b * p.n_tree + n) * p.num_splits;  // argmax_ws: (B, N, splits)
  unsigned long long best = 0;
  for (int64_t s = 0; s < p.num_splits; ++s) {
    const unsigned long long e = static_cast<unsigned long long>(w[s]);
    best = e > best ? e : best;
  }
  return unpack_index(best);
}

__global__ void __launch_bounds__(kWalkThreads) greedy_walk_kernel(const VerifyGreedyParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  const int64_t N = p.n_tree;
  const int64_t P = p.path_width;
  const int64_t* par = p.parents + b * N;       // parents: (B, N)
  const int64_t* tok = p.draft_tokens + b * N;  // draft_tokens: (B, N)
  int64_t* path = p.accept_path + b * P;        // accept_path: (B, P)
  int64_t cur = 0;
  int64_t depth = 0;
  if (P > 0) path[0] = 0;
  // Each step moves cur strictly forward (children are searched after cur), so
  // the walk ends after at most min(P - 1, N - 1) accepts. A parents value
  // outside [0, j) never equals cur (< j), so malformed trees just accept less.
  while (depth + 1 < P) {
    const int64_t want = node_argmax(p, b, cur);
    int64_t next = -1;
    for (int64_t j = cur + 1; j < N; ++j) {
      if (par[j] == cur && tok[j] == want) {
        next = j;
        break;
      }
    }
    if (next < 0) break;
    path[++depth] = next;
    cur = next;
  }
  for (int64_t k = depth + 1; k < P; ++k) path[k] = -1;
  p.accept_len[b] = depth;
  p.bonus_token[b] = node_argmax(p, b, cur);
}

// ---------------------------------------------------------------------------
// Shared sampling machinery
// ---------------------------------------------------------------------------
// Chunked inverse CDF: the first index x in order, among r(x) > 0, whose
// inclusive running sum of r exceeds u * sum(r). The vocabulary is cut into
// kChunk-token chunks and thread t owns a contiguous run of them; chunks with
// live(c) false are skipped (the caller guarantees r = 0 there: the chunk's
// maximum is below the node's kept threshold), so a top-k draw reads ~k chunks
// instead of V tokens. r must be deterministic and callable for every x in
// [0, V). Returns -1 when sum(r) is not a positive finite number or when
// rounding left no chunk owning the target; the caller falls back. Every thread
// of the block must call it; the result is uniform.
template <typename RFn, typename LiveFn>
__device__ __forceinline__ int64_t block_sample(int64_t V, double u, RFn&& r, LiveFn&& live, SampleSmem& sm) {
  const int64_t nt = blockDim.x;
  const int64_t tid = threadIdx.x;
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  const int64_t per = (chunks + nt - 1) / nt;  // chunks per thread
  int64_t k0 = tid * per;
  if (k0 > chunks) k0 = chunks;
  int64_t k1 = k0 + per;
  if (k1 > chunks) k1 = chunks;
  double local = 0.0;
  for (int64_t c = k0; c < k1; ++c) {
    if (!live(c)) continue;
    const int64_t x1 = (c + 1) * kChunk < V ? (c + 1) * kChunk : V;
    for (int64_t x = c * kChunk; x < x1; ++x) {
      const double rx = r(x);
      if (rx > 0.0) local += rx;  // also drops NaN
    }
  }
  __syncthreads();  // earlier readers of sm.incl / sm.selected are done
  if (tid == 0) sm.selected = LLONG_MAX;
  const double incl = detail::block_inclusive_scan(local, sm.dscratch);
  sm.incl[tid] = incl;
  __syncthreads();
  const double total = sm.incl[nt - 1];
  // Thread t owns [incl[t-1], incl[t]); these half-open ranges tile [0, total).
  const double excl = tid > 0 ? sm.incl[tid - 1] : 0.0;
  if (!(total > 0.0) || isinf(total)) return -1;  // block-uniform
  const double target = u * total;
  if (local > 0.0 && excl <= target && target < incl) {
    double run = excl;
    int64_t pick = -1;
    int64_t last = -1;
    for (int64_t c = k0; c < k1 && pick < 0; ++c) {
      if (!live(c)) continue;
      const int64_t x1 = (c + 1) * kChunk < V ? (c + 1) * kChunk : V;
      for (int64_t x = c * kChunk; x < x1; ++x) {
        const double rx = r(x);
        if (rx > 0.0) {
          last = x;
          run += rx;
          if (run > target) {
            pick = x;
            break;
          }
        }
      }
    }
    // Rounding (excl + r1 + r2 ... vs excl + local) can leave the crossing just
    // past the range: then its last positive entry is the answer.
    if (pick < 0) pick = last;
    if (pick >= 0) atomicMin(&sm.selected, static_cast<long long>(pick));
  }
  __syncthreads();
  const long long sel = sm.selected;
  return sel == LLONG_MAX ? -1 : static_cast<int64_t>(sel);
}

// block_sample, falling back to the largest r (first index on ties) when the
// scan found nothing; -1 only when r(x) > 0 nowhere.
template <typename RFn, typename LiveFn>
__device__ __forceinline__ int64_t block_draw(int64_t V, double u, RFn&& r, LiveFn&& live, SampleSmem& sm) {
  const int64_t idx = block_sample(V, u, r, live, sm);
  if (idx >= 0) return idx;
  unsigned long long best = 0;
  for (int64_t x = threadIdx.x; x < V; x += blockDim.x) {
    if (!live(x / kChunk)) continue;
    const float rx = static_cast<float>(r(x));
    // Non-negative floats order like their bit patterns.
    const unsigned long long e = pack_key_index(rx > 0.0f ? __float_as_uint(rx) : 0u, x);
    best = e > best ? e : best;
  }
  best = block_allreduce(best, detail::MaxOp(), sm.u64scratch);
  return unpack_key(best) > 0 ? unpack_index(best) : -1;
}

struct AllChunks {
  __device__ bool operator()(int64_t) const { return true; }
};

// ---------------------------------------------------------------------------
// Processed target distribution of one node (verify_sampling)
// ---------------------------------------------------------------------------
struct NodeDist {
  float max_s;      // max processed score s = logit / temperature
  double z;         // sum of exp(s - max_s) over the kept set (double, as the CPU op)
  uint32_t thresh;  // kept <=> key(s) >= thresh
  bool ok;          // false: no finite maximum (all NaN / -inf, or +inf present)
};

// NaN logits count as -inf (probability 0). A real IEEE division, as specified.
__device__ __forceinline__ float processed_score(float logit, float temperature) {
  const float s = __fdiv_rn(logit, temperature);
  return isnan(s) ? -INFINITY : s;
}

// Cut point j (0 <= j < m) of [lo, lo + w - 1]: strictly increasing in j, all in
// [lo, hi - 1], splitting the range into m + 1 parts of at most ceil(w / (m + 1)).
__device__ __forceinline__ uint32_t cut_at(uint32_t lo, uint64_t w, int m, int j) {
  return static_cast<uint32_t>(lo + (w * static_cast<uint64_t>(j + 1)) / static_cast<uint64_t>(m + 1) - 1);
}

// Smallest key t in [lo, hi] with pred(f(t), total) true, where
// f(t) = sum of weight over elements with key > t (non-increasing in t) and total
// = sum of all weights. pred(f(hi)) is expected to hold; if it never does, hi is
// returned. elem(v, key&) maps a raw value to its key and weight (0: ignored).
// Every pass shrinks the range about 16-fold, so the loop ends in <= 8 passes.
template <typename Acc, typename T, typename ElemFn, typename Pred>
__device__ uint32_t block_threshold_search(const T* row, int64_t V, uint32_t lo, uint32_t hi, ElemFn elem,
                                           Pred pred, Acc* scratch) {
  for (int pass = 0; pass < kMaxSearchPasses && lo < hi; ++pass) {
    const uint64_t w = static_cast<uint64_t>(hi) - lo + 1;
    const int m = w - 1 < static_cast<uint64_t>(kCuts) ? static_cast<int>(w - 1) : kCuts;  // >= 1
    uint32_t cuts[kCuts];
#pragma unroll
    for (int j = 0; j < kCuts; ++j) cuts[j] = j < m ? cut_at(lo, w, m, j) : 0xffffffffu;  // unused: never exceeded
    Acc acc[kCuts + 1];  // acc[j] = f(cuts[j]); acc[kCuts] = total
#pragma unroll
    for (int j = 0; j <= kCuts; ++j) acc[j] = Acc(0);
    block_row_for_each(row, V, [&](int64_t, float v) {
      uint32_t key;
      const Acc wt = elem(v, key);
      if (wt != Acc(0)) {
        acc[kCuts] += wt;
#pragma unroll
        for (int j = 0; j < kCuts; ++j) acc[j] += key > cuts[j] ? wt : Acc(0);
      }
    });
    detail::block_sum_array<Acc, kCuts + 1>(acc, scratch);
    int first = m;  // smallest j < m with pred true (m: none)
#pragma unroll
    for (int j = kCuts - 1; j >= 0; --j)
      if (j < m && pred(acc[j], acc[kCuts])) first = j;
    if (first < m) {
      // answer in (cuts[first - 1], cuts[first]]
      const uint32_t new_hi = cut_at(lo, w, m, first);
      if (first > 0) lo = cut_at(lo, w, m, first - 1) + 1;
      hi = new_hi;
    } else {
      lo = cut_at(lo, w, m, m - 1) + 1;  // answer in (cuts[m - 1], hi]
    }
  }
  return lo;
}

template <typename T>
__device__ NodeDist node_distribution(const T* row, int64_t V, float temperature, int64_t top_k, double top_p,
                                      SampleSmem& sm) {
  NodeDist d;
  uint32_t kmax = 0u;
  uint32_t kmin = 0xffffffffu;
  block_row_for_each(row, V, [&](int64_t, float v) {
    const uint32_t k = float_to_key(processed_score(v, temperature));
    kmax = k > kmax ? k : kmax;
    kmin = k < kmin ? k : kmin;
  });
  kmax = block_allreduce(kmax, detail::MaxOp(), sm.uscratch);
  kmin = block_allreduce(kmin, detail::MinOp(), sm.uscratch);
  const float max_s = key_to_float(kmax);
  d.max_s = max_s;
  d.z = 1.0;
  d.thresh = kmax;
  d.ok = V > 0 && isfinite(max_s);  // block-uniform
  if (!d.ok) return d;

  uint32_t t = kmin;  // keep everything
  if (top_k > 0 && top_k < V) {
    // Kept <=> #{y : s_y > s_x} < top_k <=> key(s_x) >= smallest t with count(key > t) < top_k.
    t = block_threshold_search<unsigned>(
        row, V, kmin, kmax,
        [&](float v, uint32_t& key) {
          key = float_to_key(processed_score(v, temperature));
          return 1u;
        },
        [&](unsigned cnt, unsigned) { return static_cast<int64_t>(cnt) < top_k; }, sm.uscratch);
  }
  if (top_p < 1.0) {
    // Within the top-k set: kept <=> mass{y kept : s_y > s_x} < top_p (mass normalised
    // over the top-k set, i.e. compared with top_p * Z_k; total = Z_k). Masses in double:
    // the CPU op's precision, so both backends keep the same set.
    const uint32_t tk = t;
    t = block_threshold_search<double>(
        row, V, tk, kmax,
        [&](float v, uint32_t& key) {
          const float s = processed_score(v, temperature);
          key = float_to_key(s);
          return key >= tk ? exp(static_cast<double>(s) - static_cast<double>(max_s)) : 0.0;
        },
        [&](double mass, double z_k) { return mass < top_p * z_k; }, sm.fscratch);
  }
  d.thresh = t;
  double z = 0.0;
  block_row_for_each(row, V, [&](int64_t, float v) {
    const float s = processed_score(v, temperature);
    if (float_to_key(s) >= t) z += exp(static_cast<double>(s) - static_cast<double>(max_s));
  });
  d.z = block_allreduce(z, detail::SumOp(), sm.fscratch);  // >= 1: the max is always kept
  return d;
}

// p(x) of the node in double, the CPU op's expression: exp(double(s) - max) / Z.
template <typename T>
__device__ __forceinline__ double token_prob(const T* row, int64_t x, const NodeDist& d, float temperature) {
  const float s = processed_score(to_float(row[x]), temperature);
  return float_to_key(s) >= d.thresh ? exp(static_cast<double>(s) - static_cast<double>(d.max_s)) / d.z : 0.0;
}

__device__ __forceinline__ bool is_rejected(const SampleSmem& sm, int n_rej, int64_t x) {
  for (int k = 0; k < n_rej; ++k)
    if (sm.rejected[k] == x) return true;
  return false;
}

// ---------------------------------------------------------------------------
// verify_sampling, kernel 1: every node's processed distribution, one block per node
// ---------------------------------------------------------------------------
// Fast path (top-k on, k <= number of chunks): one pass over the row records each
// 64-token chunk's maximum key (kept in the workspace for the walk's draws); the
// k-th largest chunk maximum is a lower bound of the top-k threshold (k distinct
// tokens reach it), so the candidates are the tokens >= it in the chunks whose
// maximum reaches it, ~k chunks. The threshold is their k-th largest key (radix
// select in shared memory); the kept tokens are sorted and scanned in double for
// top-p and Z. Other settings (top-p alone, k above the chunk count, more
// candidates than fit) take node_distribution's multi-pass search over the row.
struct SelectSmem {
  unsigned hist[256];
  unsigned cand[kMaxCand];
  unsigned kept[kMaxKept];
  unsigned sorted[kMaxKept];
  double prefix[kMaxKept];  // inclusive prefix sums of p over sorted
  int n_cand;
  int n_kept;
  unsigned pick[2];         // radix select: bin, remaining rank
};
static_assert(sizeof(SampleSmem) + sizeof(SelectSmem) <= 48 * 1024, "node_dist_kernel's static shared memory");

// k-th largest (1-based, with multiplicity; 1 <= k <= n) of n keys load(i), by a 4-pass 8-bit radix
// select. Integer counts only, so the result is exact and deterministic. Every thread must call it.
template <typename Load>
__device__ uint32_t block_kth_largest(Load&& load, int64_t n, int64_t k, SelectSmem& ss) {
  const int lane = threadIdx.x & 31;
  uint32_t prefix = 0u;
  uint32_t mask = 0u;
  for (int shift = 24; shift >= 0; shift -= 8) {
    __syncthreads();  // earlier readers of hist / pick are done
    for (int i = threadIdx.x; i < 256; i += blockDim.x) ss.hist[i] = 0u;
    __syncthreads();
    // Keys mostly share their high bytes: lanes of a warp with the same bin add once (warp-aggregated),
    // instead of 32 conflicting shared atomics. The trip count is block-uniform, so every lane matches.
    for (int64_t i0 = 0; i0 < n; i0 += blockDim.x) {
      const int64_t i = i0 + threadIdx.x;
      int bin = -1;
      if (i < n) {
        const uint32_t v = load(i);
        if ((v & mask) == prefix) bin = static_cast<int>((v >> shift) & 255u);
      }
      const unsigned peers = __match_any_sync(detail::kFullMask, bin);
      if (bin >= 0 && __ffs(peers) - 1 == lane) atomicAdd(&ss.hist[bin], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // lane l holds bins 255 - 8 l .. 248 - 8 l (from the top); inclusive scan of their counts over lanes
      unsigned cnt[8];
      unsigned sum = 0u;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += (cnt[j] = ss.hist[255 - 8 * lane - j]);
      unsigned incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(detail::kFullMask, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned excl = incl - sum;
      if (excl < k && k <= incl) {  // exactly one lane: the k-th largest is in one of its bins
        unsigned run = excl;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (run < k && k <= run + cnt[j]) {
            ss.pick[0] = 255u - 8u * lane - j;
            ss.pick[1] = static_cast<unsigned>(k - run);
          }
          run += cnt[j];
        }
      }
    }
    __syncthreads();
    prefix |= ss.pick[0] << shift;
    mask |= 255u << shift;
    k = ss.pick[1];
  }
  return prefix;
}

// The 8 tokens 64 c + 8 sub .. + 7 of chunk c (sub = lane % 8) as keys of their processed scores; tokens
// past V get key 0, below every real key (key(-inf) > 0). vec: the row may be read in 16-byte vectors.
template <typename T>
__device__ __forceinline__ void chunk_keys(const T* row, int64_t V, int64_t c, int sub, bool vec, float temp,
                                           uint32_t (&keys)[8]) {
  const int64_t x0 = c * kChunk + 8 * sub;
  float v[8];
  if (vec && x0 + 8 <= V) {
    constexpr int kVec = detail::VecTraits<T>::kElems;  // 4 (fp32) or 8
    const uint4* p = reinterpret_cast<const uint4*>(row + x0);
#pragma unroll
    for (int h = 0; h < 8 / kVec; ++h) {
      float part[kVec];
      detail::unpack16(p[h], part, T());
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[h * kVec + e] = part[e];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) keys[e] = float_to_key(processed_score(v[e], temp));
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      keys[e] = x0 + e < V ? float_to_key(processed_score(to_float(row[x0 + e]), temp)) : 0u;
  }
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads)
    node_dist_kernel(const VerifySamplingParams p, NodeDist* __restrict__ dists, uint32_t* __restrict__ cmax_all,
                     bool vec) {
  __shared__ SampleSmem sm;
  __shared__ SelectSmem ss;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x >> 5);
  const int64_t V = p.vocab;
  const int64_t C = (V + kChunk - 1) / kChunk;
  const float temp = p.temperature;
  const int64_t node = blockIdx.x;                                   // b * N + n
  const T* row = static_cast<const T*>(p.logits) + node * V;         // (V,) row of logits (B, N, V)
  uint32_t* cm = cmax_all + node * C;                                // (C,) chunk maxima of this row
  const int sub = lane & 7;
  const int group = lane >> 3;  // 4 chunks per warp step, 8 lanes each

  // ---- pass 1: chunk maxima, row max / min ----
  uint32_t kmax = 0u;
  uint32_t kmin = 0xffffffffu;
  for (int64_t c0 = static_cast<int64_t>(warp) * 4; c0 < C; c0 += 4 * nwarps) {  // warp-uniform trip count
    const int64_t c = c0 + group;
    uint32_t keys[8];
    chunk_keys(row, V, c < C ? c : C - 1, sub, vec, temp, keys);
    uint32_t cmx = 0u;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      cmx = keys[e] > cmx ? keys[e] : cmx;
      if (keys[e] != 0u && keys[e] < kmin) kmin = keys[e];
    }
    cmx = max(cmx, __shfl_xor_sync(detail::kFullMask, cmx, 1));
    cmx = max(cmx, __shfl_xor_sync(detail::kFullMask, cmx, 2));
    cmx = max(cmx, __shfl_xor_sync(detail::kFullMask, cmx, 4));
    if (c < C && sub == 0) cm[c] = cmx;
    kmax = cmx > kmax ? cmx : kmax;
  }
  kmax = block_allreduce(kmax, detail::MaxOp(), sm.uscratch);
  kmin = block_allreduce(kmin, detail::MinOp(), sm.uscratch);
  NodeDist d;
  d.max_s = key_to_float(kmax);
  d.z = 1.0;
  d.thresh = kmax;
  d.ok = isfinite(d.max_s);  // block-uniform
  const bool top_k_on = p.top_k > 0 && p.top_k < V;
  const bool top_p_on = p.top_p < 1.0;
  bool done = !d.ok;

  if (!done && !top_k_on && !top_p_on) {  // temperature only: keep everything, Z in one pass
    d.thresh = kmin;
    double z = 0.0;
    block_row_for_each(row, V, [&](int64_t, float v) {
      z += exp(static_cast<double>(processed_score(v, temp)) - static_cast<double>(d.max_s));
    });
    d.z = block_allreduce(z, detail::SumOp(), sm.fscratch);
    done = true;
  }
  if (!done && top_k_on && p.top_k <= C && p.top_k <= kMaxKept) {  // else the kept set cannot fit: fall back
    __syncthreads();  // cm[] of every warp is written (global memory, read back by other warps)
    const uint32_t floor = block_kth_largest([&](int64_t i) { return cm[i]; }, C, p.top_k, ss);
    // ---- gather the candidates: tokens >= floor in chunks whose maximum reaches it ----
    if (threadIdx.x == 0) ss.n_cand = 0;
    __syncthreads();
    for (int64_t c0 = static_cast<int64_t>(warp) * 4; c0 < C; c0 += 4 * nwarps) {
      const int64_t c = c0 + group;
      if (c >= C || cm[c] < floor) continue;  // no shuffles below: divergence is fine
      uint32_t keys[8];
      chunk_keys(row, V, c, sub, vec, temp, keys);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (keys[e] >= floor) {
          const int at = atomicAdd(&ss.n_cand, 1);
          if (at < kMaxCand) ss.cand[at] = keys[e];
        }
      }
    }
    __syncthreads();
    const int64_t n_cand = ss.n_cand;  // >= top_k: the top_k largest chunk maxima are candidates
    if (n_cand <= kMaxCand) {
      const uint32_t tk = block_kth_largest([&](int64_t i) { return ss.cand[i]; }, n_cand, p.top_k, ss);
      if (threadIdx.x == 0) ss.n_kept = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < n_cand; i += blockDim.x) {
        if (ss.cand[i] >= tk) {
          const int at = atomicAdd(&ss.n_kept, 1);
          if (at < kMaxKept) ss.kept[at] = ss.cand[i];
        }
      }
      __syncthreads();
      const int n_kept = ss.n_kept;
      if (n_kept <= kMaxKept) {
        // ---- sort the kept keys, descending (rank sort: equal keys are equal values, so their
        // order never changes a sum) ----
        for (int i = threadIdx.x; i < n_kept; i += blockDim.x) {
          const uint32_t ki = ss.kept[i];
          int rank = 0;
          for (int j = 0; j < n_kept; ++j) {
            const uint32_t kj = ss.kept[j];
            rank += (kj > ki) || (kj == ki && j < i);
          }
          ss.sorted[rank] = ki;
        }
        __syncthreads();
        // ---- p in double over the sorted keys (in parallel), then their inclusive prefix sums in
        // order by one thread: exact, monotone and the same on every run (<= kMaxKept adds) ----
        for (int i = threadIdx.x; i < n_kept; i += blockDim.x)
          ss.prefix[i] = exp(static_cast<double>(key_to_float(ss.sorted[i])) - static_cast<double>(d.max_s));
        __syncthreads();
        if (threadIdx.x == 0)
          for (int i = 1; i < n_kept; ++i) ss.prefix[i] += ss.prefix[i - 1];
        __syncthreads();
        const double zk = ss.prefix[n_kept - 1];  // mass of the top-k set
        uint32_t t = tk;
        double z = zk;
        if (top_p_on) {
          // Kept <=> the top-k mass of strictly larger scores is < top_p * zk: a prefix of the sorted keys
          // in whole groups of equal keys (a group's "before" is the sum up to its first member).
          const double bound = p.top_p * zk;
          uint32_t tmin = 0xffffffffu;
          for (int i = threadIdx.x; i < n_kept; i += blockDim.x) {
            const bool first_of_group = i == 0 || ss.sorted[i - 1] != ss.sorted[i];
            const double before = i == 0 ? 0.0 : ss.prefix[i - 1];
            if (first_of_group && before < bound && ss.sorted[i] < tmin) tmin = ss.sorted[i];
          }
          t = block_allreduce(tmin, detail::MinOp(), sm.uscratch);  // the first group always qualifies
          double zt = 0.0;
          for (int i = threadIdx.x; i < n_kept; i += blockDim.x)
            if (ss.sorted[i] >= t && (i + 1 == n_kept || ss.sorted[i + 1] < t)) zt = ss.prefix[i];  // last kept
          z = block_allreduce(zt, detail::MaxOp(), sm.fscratch);
        }
        d.thresh = t;
        d.z = z;
        done = true;
      }
    }
  }
  if (!done) d = node_distribution(row, V, temp, p.top_k, p.top_p, sm);  // multi-pass search over the row
  if (threadIdx.x == 0) dists[node] = d;
}

// ---------------------------------------------------------------------------
// verify_sampling, kernel 2: the tree walk, one block per batch row
// ---------------------------------------------------------------------------
template <typename T>
__global__ void VISPEC_SAMPLE_BOUNDS
    verify_walk_kernel(const VerifySamplingParams p, const NodeDist* __restrict__ dists,
                       const uint32_t* __restrict__ cmax_all) {
  __shared__ SampleSmem sm;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t N = p.n_tree;
  const int64_t V = p.vocab;
  const int64_t C = (V + kChunk - 1) / kChunk;
  const int64_t P = p.path_width;
  const float temp = p.temperature;
  const T* logits_b = static_cast<const T*>(p.logits) + b * N * V;  // (N, V) slice of logits (B, N, V)
  const int64_t* par = p.parents + b * N;                           // parents: (B, N)
  const int64_t* tok = p.draft_tokens + b * N;                      // draft_tokens: (B, N)
  const double* uni = p.uniforms + b * N;                           // uniforms: (B, N)
  int64_t* path = p.accept_path + b * P;                            // accept_path: (B, P)

  int64_t cur = 0;
  int64_t depth = 0;  // accepted draft nodes
  int64_t bonus = 0;
  if (tid == 0 && P > 0) path[0] = 0;
  // Every iteration either stops or moves cur strictly forward: <= N iterations.
  for (int64_t it = 0; it <= N; ++it) {
    const T* row = logits_b + cur * V;  // logits of node cur: (V,)
    const NodeDist d = dists[b * N + cur];
    if (!d.ok) {  // degenerate row (no finite max): stop here, bonus 0
      bonus = 0;
      break;
    }
    int n_rej = 0;
    int64_t next = -1;
    if (depth + 1 < P) {
      __syncthreads();  // every thread has read the previous node's sm.next / sm.n_rejected
      if (tid == 0) {
        double mass = 1.0;  // residual mass left at this node
        for (int64_t j = cur + 1; j < N; ++j) {
          if (par[j] != cur) continue;  // parents outside [0, j) never match
          const int64_t t = tok[j];
          double pt = 0.0;  // out-of-range or already-rejected token: probability 0
          if (t >= 0 && t < V && !is_rejected(sm, n_rej, t)) pt = token_prob(row, t, d, temp);
          const double u = uni[j];
          // Masses and p in double, as the CPU op: the kept set's probabilities sum to 1 up to
          // double rounding, so the last kept child is accepted unless u is within ~1e-15 of 1
          // (in fp32 a sum below 1 left it rejectable with an empty residual).
          if (pt > 0.0 && u * mass < pt) {
            next = j;
            break;
          }
          mass -= pt;
          if (mass < 0.0) mass = 0.0;  // rounding: keeps the test u * mass < p(t) meaningful
          if (pt > 0.0 && n_rej < kMaxRejected) sm.rejected[n_rej++] = static_cast<int>(t);
        }
        sm.n_rejected = n_rej;
        sm.next = next;
      }
      __syncthreads();
      n_rej = sm.n_rejected;
      next = sm.next;
    }
    if (next >= 0) {
      ++depth;
      if (tid == 0) path[depth] = next;
      cur = next;
      continue;
    }
    // Bonus: residual of node cur (rejected children zeroed; none when the accept limit stopped the
    // walk), drawn with uniforms[b, 0]; chunks whose maximum is below the kept threshold hold no mass.
    const int nr = n_rej;
    const uint32_t* cm = cmax_all + (b * N + cur) * C;
    const uint32_t thresh = d.thresh;
    bonus = block_draw(
        V, uni[0],
        [=](int64_t x) {  // by value: no address of a local is taken (it would live on the stack)
          const double px = token_prob(row, x, d, temp);
          return (px > 0.0 && is_rejected(sm, nr, x)) ? 0.0 : px;
        },
        [=](int64_t c) { return cm[c] >= thresh; }, sm);
    if (bonus < 0) {
      // Residual empty (rounding only): the argmax of the processed target, first index on
      // ties, as the CPU op. A token top-k / top-p excluded can never come out.
      unsigned long long best = 0;
      block_row_for_each(row, V, [&](int64_t x, float v) {
        const unsigned long long e = pack_key_index(float_to_key(processed_score(v, temp)), x);
        best = e > best ? e : best;
      });
      best = block_allreduce(best, detail::MaxOp(), sm.u64scratch);
      bonus = unpack_index(best);  // V >= 1 here (d.ok)
    }
    break;
  }
  if (tid == 0) {
    for (int64_t k = depth + 1; k < P; ++k) path[k] = -1;
    p.accept_len[b] = depth;
    p.bonus_token[b] = bonus;
  }
}

// ---------------------------------------------------------------------------
// chain_speculative_sampling: one block per batch row
// ---------------------------------------------------------------------------
template <typename T>
__global__ void VISPEC_SAMPLE_BOUNDS chain_sampling_kernel(const ChainSamplingParams p) {
  __shared__ SampleSmem sm;
  const int64_t b = blockIdx.x;
  const int64_t K = p.num_spec;
  const int64_t V = p.vocab;
  const T* q_b = static_cast<const T*>(p.draft_probs) + b * K * V;          // (K, V) slice of (B, K, V)
  const T* p_b = static_cast<const T*>(p.target_probs) + b * (K + 1) * V;   // (K + 1, V) slice of (B, K + 1, V)
  const int64_t* x_b = p.draft_tokens + b * K;                              // draft_tokens: (B, K)
  const double* u_b = p.uniforms + b * (K + 1);                             // uniforms: (B, K + 1)
  int64_t* out = p.tokens + b * (K + 1);                                    // tokens: (B, K + 1)

  if (threadIdx.x == 0) {
    int64_t i = 0;
    for (; i < K; ++i) {
      const int64_t x = x_b[i];
      double q = 0.0;  // out-of-range draft token: q = p = 0, i.e. rejected
      double pt = 0.0;
      if (x >= 0 && x < V) {
        q = to_float(q_b[i * V + x]);
        pt = to_float(p_b[i * V + x]);
      }
      if (!(u_b[i] * q < pt)) break;  // NaN compares false: rejected
    }
    sm.reject_at = i;
  }
  __syncthreads();
  const int64_t i = sm.reject_at;
  const double u = u_b[K];
  int64_t extra;
  if (i < K) {
    const T* qi = q_b + i * V;  // draft probs of step i: (V,)
    const T* pi = p_b + i * V;  // target probs of step i: (V,)
    // fmaxf(NaN, 0) = 0: malformed entries get no mass.
    extra = block_draw(V, u, [&](int64_t y) { return fmaxf(to_float(pi[y]) - to_float(qi[y]), 0.0f); }, AllChunks(), sm);
    if (extra < 0) extra = block_draw(V, u, [&](int64_t y) { return fmaxf(to_float(pi[y]), 0.0f); }, AllChunks(), sm);
    if (extra < 0) {  // p_i is zero everywhere: keep the draft token (0 if out of range)
      const int64_t x = x_b[i];
      extra = (x >= 0 && x < V) ? x : 0;
    }
  } else {
    const T* pk = p_b + K * V;  // target probs after the last draft: (V,)
    extra = block_draw(V, u, [&](int64_t y) { return fmaxf(to_float(pk[y]), 0.0f); }, AllChunks(), sm);
    if (extra < 0) {  // p_K zero everywhere: the last draft token (as the CPU op), 0 without one
      const int64_t x = K > 0 ? x_b[K - 1] : 0;
      extra = (x >= 0 && x < V) ? x : 0;
    }
  }
  if (threadIdx.x == 0) {
    for (int64_t k = 0; k < i; ++k) out[k] = x_b[k];
    out[i] = extra;
    for (int64_t k = i + 1; k <= K; ++k) out[k] = -1;
    p.accept_len[b] = i;
  }
}

}  // namespace

int64_t verify_greedy_num_splits(const VerifyGreedyParams& p, int num_sms) {
  const int64_t rows = p.batch * p.n_tree;
  if (rows <= 0 || p.vocab <= 0) return 1;
  // >= 2 blocks per SM, and >= 4096 tokens per block so a split is never mostly reduction
  int64_t splits = (2 * static_cast<int64_t>(num_sms < 1 ? 1 : num_sms) + rows - 1) / rows;
  const int64_t by_len = p.vocab / 4096;
  if (splits > by_len) splits = by_len;
  if (splits > 64) splits = 64;
  return splits < 1 ? 1 : splits;
}

cudaError_t verify_greedy(const VerifyGreedyParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.n_tree <= 0 || p.vocab <= 0 || p.path_width < 0 || p.num_splits < 1) return cudaErrorInvalidValue;
  const int64_t blocks = p.batch * p.n_tree * p.num_splits;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid_a = static_cast<unsigned>(blocks);
  switch (p.dtype) {
    case DType::kFloat32:
      row_argmax_kernel<float><<<grid_a, kArgmaxThreads, 0, stream>>>(static_cast<const float*>(p.logits), p.vocab,
                                                                      p.num_splits, p.argmax_ws);
      break;
    case DType::kFloat16:
      row_argmax_kernel<__half><<<grid_a, kArgmaxThreads, 0, stream>>>(static_cast<const __half*>(p.logits),
                                                                       p.vocab, p.num_splits, p.argmax_ws);
      break;
    case DType::kBFloat16:
      row_argmax_kernel<__nv_bfloat16><<<grid_a, kArgmaxThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(p.logits), p.vocab, p.num_splits, p.argmax_ws);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const unsigned grid_b = static_cast<unsigned>((p.batch + kWalkThreads - 1) / kWalkThreads);
  greedy_walk_kernel<<<grid_b, kWalkThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

namespace {
struct SamplingWorkspace {
  NodeDist* dists;   // (B * N,)
  uint32_t* cmax;    // (B * N, C) chunk maxima
};
SamplingWorkspace sampling_workspace(const VerifySamplingParams& p) {
  SamplingWorkspace w;
  w.dists = static_cast<NodeDist*>(p.workspace);
  w.cmax = reinterpret_cast<uint32_t*>(w.dists + p.batch * p.n_tree);
  return w;
}

template <typename T>
cudaError_t launch_sampling(const VerifySamplingParams& p, cudaStream_t stream) {
  const SamplingWorkspace w = sampling_workspace(p);
  // 16-byte row reads need every row 16-byte aligned: the base and the row length.
  const bool vec = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (p.vocab * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  node_dist_kernel<T><<<static_cast<unsigned>(p.batch * p.n_tree), kSampleThreads, 0, stream>>>(p, w.dists, w.cmax, vec);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  verify_walk_kernel<T><<<static_cast<unsigned>(p.batch), kSampleThreads, 0, stream>>>(p, w.dists, w.cmax);
  return cudaGetLastError();
}
}  // namespace

size_t verify_sampling_workspace_bytes(const VerifySamplingParams& p) {
  if (p.batch <= 0 || p.n_tree <= 0 || p.vocab <= 0) return 0;
  const size_t nodes = static_cast<size_t>(p.batch) * static_cast<size_t>(p.n_tree);
  const size_t chunks = static_cast<size_t>((p.vocab + kChunk - 1) / kChunk);
  return nodes * sizeof(NodeDist) + nodes * chunks * sizeof(uint32_t);
}

cudaError_t verify_sampling(const VerifySamplingParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.n_tree <= 0 || p.vocab <= 0 || p.path_width < 0) return cudaErrorInvalidValue;
  if (p.vocab > 0x7fffffffLL || p.batch > 0x7fffffffLL) return cudaErrorInvalidValue;  // tokens stored as int
  if (p.batch * p.n_tree > 0x7fffffffLL || p.workspace == nullptr) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_sampling<float>(p, stream);
    case DType::kFloat16: return launch_sampling<__half>(p, stream);
    case DType::kBFloat16: return launch_sampling<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t chain_speculative_sampling(const ChainSamplingParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.num_spec < 0 || p.vocab <= 0) return cudaErrorInvalidValue;
  if (p.vocab > 0x7fffffffLL || p.batch > 0x7fffffffLL) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(p.batch);
  switch (p.dtype) {
    case DType::kFloat32:
      chain_sampling_kernel<float><<<grid, kSampleThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      chain_sampling_kernel<__half><<<grid, kSampleThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      chain_sampling_kernel<__nv_bfloat16><<<grid, kSampleThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vispec
