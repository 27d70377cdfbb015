// Verification kernels: greedy tree verification, lossless multi-round rejection
// sampling over a token tree, and chain speculative sampling.
//
// verify_greedy: kernel A (one block per (b, n) row) computes the argmax of the
//   target logits with torch.argmax semantics; kernel B (one thread per batch row)
//   walks the tree.
// verify_sampling: one block per batch row walks the tree. A node's processed
//   distribution is described by three block-uniform scalars (max score, kept-key
//   threshold, normaliser Z); the top-k / top-p thresholds are found by a 16-way
//   search over the monotone 32-bit key space (15 block-wide counts or masses per
//   pass over the row, at most 8 passes per threshold).
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

#include "cuda/common.cuh"
#include "vispec/launchers.h"

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

constexpr int kArgmaxThreads = 256;
constexpr int kWalkThreads = 128;
constexpr int kSampleThreads = 512;
constexpr int kMaxRejected = 1024;  // distinct rejected tokens remembered per node (children of one node)
constexpr int kCuts = 15;           // cut points per search pass: 16-way search, <= 8 passes for 2^32 keys
constexpr int kMaxSearchPasses = 12;

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

template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads)
    row_argmax_kernel(const T* __restrict__ logits, int64_t vocab, int64_t* __restrict__ argmax) {
  __shared__ unsigned long long scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;  // logits: (B * N, V)
  // 0 loses to every real entry: a real key is >= key(-inf) > 0 (NaNs map to the max key).
  unsigned long long best = 0;
  block_row_for_each(x, vocab, [&](int64_t i, float v) {
    const unsigned long long e = argmax_entry(v, i);
    best = e > best ? e : best;
  });
  best = block_allreduce(best, detail::MaxOp(), scratch);
  if (threadIdx.x == 0) argmax[row] = vocab > 0 ? unpack_index(best) : 0;  // argmax: (B * N,)
}

__global__ void __launch_bounds__(kWalkThreads) greedy_walk_kernel(const VerifyGreedyParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  const int64_t N = p.n_tree;
  const int64_t P = p.path_width;
  const int64_t* am = p.argmax_ws + b * N;      // argmax_ws: (B, N)
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
    const int64_t want = am[cur];
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
  p.bonus_token[b] = am[cur];
}

// ---------------------------------------------------------------------------
// Shared sampling machinery
// ---------------------------------------------------------------------------
// Chunked inverse CDF: the first index x in order, among r(x) > 0, whose
// inclusive running sum of r exceeds u * sum(r). r must be deterministic and
// callable for every x in [0, V). Returns -1 when sum(r) is not a positive
// finite number or when rounding left no chunk owning the target; the caller
// falls back. Every thread of the block must call it; the result is uniform.
template <typename RFn>
__device__ int64_t block_sample(int64_t V, double u, RFn&& r, SampleSmem& sm) {
  const int64_t nt = blockDim.x;
  const int64_t tid = threadIdx.x;
  const int64_t chunk = (V + nt - 1) / nt;
  int64_t c0 = tid * chunk;
  if (c0 > V) c0 = V;
  int64_t c1 = c0 + chunk;
  if (c1 > V) c1 = V;
  double local = 0.0;
  for (int64_t x = c0; x < c1; ++x) {
    const double rx = r(x);
    if (rx > 0.0) local += rx;  // also drops NaN
  }
  __syncthreads();  // earlier readers of sm.incl / sm.selected are done
  if (tid == 0) sm.selected = LLONG_MAX;
  const double incl = detail::block_inclusive_scan(local, sm.dscratch);
  sm.incl[tid] = incl;
  __syncthreads();
  const double total = sm.incl[nt - 1];
  // Chunk t owns [incl[t-1], incl[t]); these half-open ranges tile [0, total).
  const double excl = tid > 0 ? sm.incl[tid - 1] : 0.0;
  if (!(total > 0.0) || isinf(total)) return -1;  // block-uniform
  const double target = u * total;
  if (local > 0.0 && excl <= target && target < incl) {
    double run = excl;
    int64_t pick = -1;
    int64_t last = -1;
    for (int64_t x = c0; x < c1; ++x) {
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
    // Rounding (excl + r1 + r2 ... vs excl + local) can leave the crossing just
    // past the chunk: then the chunk's last positive entry is the answer.
    if (pick < 0) pick = last;
    if (pick >= 0) atomicMin(&sm.selected, static_cast<long long>(pick));
  }
  __syncthreads();
  const long long sel = sm.selected;
  return sel == LLONG_MAX ? -1 : static_cast<int64_t>(sel);
}

// block_sample, falling back to the largest r (first index on ties) when the
// scan found nothing; -1 only when r(x) > 0 nowhere.
template <typename RFn>
__device__ int64_t block_draw(int64_t V, double u, RFn&& r, SampleSmem& sm) {
  const int64_t idx = block_sample(V, u, r, sm);
  if (idx >= 0) return idx;
  unsigned long long best = 0;
  for (int64_t x = threadIdx.x; x < V; x += blockDim.x) {
    const float rx = static_cast<float>(r(x));
    // Non-negative floats order like their bit patterns.
    const unsigned long long e = pack_key_index(rx > 0.0f ? __float_as_uint(rx) : 0u, x);
    best = e > best ? e : best;
  }
  best = block_allreduce(best, detail::MaxOp(), sm.u64scratch);
  return unpack_key(best) > 0 ? unpack_index(best) : -1;
}

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
// verify_sampling: one block per batch row
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kSampleThreads) verify_sampling_kernel(const VerifySamplingParams p) {
  __shared__ SampleSmem sm;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t N = p.n_tree;
  const int64_t V = p.vocab;
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
    const NodeDist d = node_distribution(row, V, temp, p.top_k, p.top_p, sm);
    if (!d.ok) {  // degenerate row (no finite max): stop here, bonus 0
      bonus = 0;
      break;
    }
    int n_rej = 0;
    int64_t next = -1;
    if (depth + 1 < P) {
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
    // Bonus: residual of node cur (rejected children zeroed; none when the
    // accept limit stopped the walk), drawn with uniforms[b, 0].
    const int nr = n_rej;
    bonus = block_draw(
        V, uni[0],
        [&](int64_t x) {
          const double px = token_prob(row, x, d, temp);
          return (px > 0.0 && is_rejected(sm, nr, x)) ? 0.0 : px;
        },
        sm);
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
__global__ void __launch_bounds__(kSampleThreads) chain_sampling_kernel(const ChainSamplingParams p) {
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
    extra = block_draw(V, u, [&](int64_t y) { return fmaxf(to_float(pi[y]) - to_float(qi[y]), 0.0f); }, sm);
    if (extra < 0) extra = block_draw(V, u, [&](int64_t y) { return fmaxf(to_float(pi[y]), 0.0f); }, sm);
    if (extra < 0) {  // p_i is zero everywhere: keep the draft token (0 if out of range)
      const int64_t x = x_b[i];
      extra = (x >= 0 && x < V) ? x : 0;
    }
  } else {
    const T* pk = p_b + K * V;  // target probs after the last draft: (V,)
    extra = block_draw(V, u, [&](int64_t y) { return fmaxf(to_float(pk[y]), 0.0f); }, sm);
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

cudaError_t verify_greedy(const VerifyGreedyParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.n_tree <= 0 || p.vocab <= 0 || p.path_width < 0) return cudaErrorInvalidValue;
  const int64_t rows = p.batch * p.n_tree;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid_a = static_cast<unsigned>(rows);
  switch (p.dtype) {
    case DType::kFloat32:
      row_argmax_kernel<float><<<grid_a, kArgmaxThreads, 0, stream>>>(static_cast<const float*>(p.logits), p.vocab,
                                                                      p.argmax_ws);
      break;
    case DType::kFloat16:
      row_argmax_kernel<__half><<<grid_a, kArgmaxThreads, 0, stream>>>(static_cast<const __half*>(p.logits),
                                                                       p.vocab, p.argmax_ws);
      break;
    case DType::kBFloat16:
      row_argmax_kernel<__nv_bfloat16><<<grid_a, kArgmaxThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(p.logits), p.vocab, p.argmax_ws);
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

cudaError_t verify_sampling(const VerifySamplingParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.n_tree <= 0 || p.vocab <= 0 || p.path_width < 0) return cudaErrorInvalidValue;
  if (p.vocab > 0x7fffffffLL || p.batch > 0x7fffffffLL) return cudaErrorInvalidValue;  // tokens stored as int
  const unsigned grid = static_cast<unsigned>(p.batch);
  switch (p.dtype) {
    case DType::kFloat32:
      verify_sampling_kernel<float><<<grid, kSampleThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      verify_sampling_kernel<__half><<<grid, kSampleThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      verify_sampling_kernel<__nv_bfloat16><<<grid, kSampleThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
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
