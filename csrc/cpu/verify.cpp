// Tree verification on the CPU: greedy (argmax match), lossless multi-round
// rejection sampling for deterministic top-k drafts, and chain speculative
// sampling for stochastic drafts. Semantics are documented once, in
// csrc/include/vispec/launchers.h; the CUDA kernels implement the same ones.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "common.h"
#include "validate.h"

namespace vispec {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
int64_t fast_argmax(const T* x, int64_t n) {
  return argmax_row(x, n);  // common.h: AVX-512 when the CPU has it
}

// ---------------------------------------------------------------------------
// Greedy
// ---------------------------------------------------------------------------
template <typename T>
void verify_greedy_kernel(const at::Tensor& logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
                          at::Tensor& path, at::Tensor& alen, at::Tensor& bonus) {
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2), P = path.size(1);
  const T* lg = logits.data_ptr<T>();
  std::vector<int64_t> amax(B * N);
  // Every row's argmax first (one pass over the logits), then the cheap walk.
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) amax[r] = fast_argmax(lg + r * V, V);
  });
  const int64_t* tok = draft_tokens.data_ptr<int64_t>();
  const int64_t* par = parents.data_ptr<int64_t>();
  int64_t* pp = path.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t cur = 0, n_acc = 0;
    pp[b * P] = 0;
    while (n_acc < P - 1) {
      const int64_t want = amax[b * N + cur];
      int64_t next = -1;
      for (int64_t j = cur + 1; j < N; ++j) {
        if (par[b * N + j] == cur && tok[b * N + j] == want) {
          next = j;  // the first matching sibling wins; later duplicates are never needed
          break;
        }
      }
      if (next < 0) break;
      pp[b * P + ++n_acc] = next;
      cur = next;
    }
    for (int64_t i = n_acc + 1; i < P; ++i) pp[b * P + i] = -1;
    alen.data_ptr<int64_t>()[b] = n_acc;
    bonus.data_ptr<int64_t>()[b] = amax[b * N + cur];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& target_logits,
                                                                 const at::Tensor& draft_tokens,
                                                                 const at::Tensor& parents, int64_t max_accept) {
  check_verify(target_logits, draft_tokens, parents, max_accept);
  check_verify_values(draft_tokens, parents, target_logits.size(2));
  const int64_t B = target_logits.size(0);
  auto opts = draft_tokens.options();
  at::Tensor path = at::empty({B, max_accept + 1}, opts), alen = at::empty({B}, opts), bonus = at::empty({B}, opts);
  dispatch_float(target_logits.scalar_type(), "verify_greedy", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    verify_greedy_kernel<T>(target_logits, draft_tokens, parents, path, alen, bonus);
  });
  return {path, alen, bonus};
}

// ---------------------------------------------------------------------------
// Processed target distribution of one node (temperature, top-k, top-p)
// ---------------------------------------------------------------------------
// One vectorised pass over the logits row finds the maximum of every chunk of kScanChunk values;
// top-k and the survivor list then visit only the chunks whose maximum can matter (with top-k 50 of
// 152k, a few hundred of ~2400), so a node costs about one read of its logits. s(x) = logit / T with
// NaN -> -inf is recomputed where needed (the same expression each time). Division by T > 0 is
// monotonic, so a chunk's maximum of s is its maximum logit / T. The scalars are those of the CUDA
// kernel: p(x) = [s_x >= thr] exp(s_x - max) / Z.
template <typename T>
struct NodeDist {
  const T* row = nullptr;
  int64_t V = 0;
  float temperature = 1.0f;
  std::vector<float> chunk_max, sorted;
  std::vector<int64_t> keep;  // tokens with s >= thr and s > -inf, in index order (the inverse CDF's order)
  std::vector<float> keep_v;  // their s
  std::vector<double> w;      // exp(s - max) of each kept token
  float max = kNegInf, thr = kNegInf;
  double Z = 0.0;
  bool valid = false;  // false when no logit is finite (NaN or -inf everywhere)

  float s(int64_t x) const {
    const float v = static_cast<float>(row[x]) / temperature;  // division, as HF's temperature warper
    return v == v ? v : kNegInf;
  }

  void build(const T* row_, int64_t V_, float temperature_, int64_t top_k, double top_p) {
    row = row_;
    V = V_;
    temperature = temperature_;
    const int64_t chunks = (V + kScanChunk - 1) / kScanChunk;
    chunk_max.resize(chunks);
    const float raw_max = row_scan(row, V, chunk_max.data()).max;
    for (float& m : chunk_max) m /= temperature;  // -inf stays -inf
    max = raw_max / temperature;
    valid = std::isfinite(max);
    thr = kNegInf;
    keep.clear();
    w.clear();
    Z = 0.0;
    if (!valid) return;
    // top-k keeps x iff fewer than k tokens score strictly higher: ties at the k-th value all stay.
    // The k-th largest chunk maximum is a lower bound of the k-th largest value (k chunks hold a value
    // at least that large), so only chunks whose maximum reaches it can hold a kept token: about k chunks.
    float floor = kNegInf;
    if (top_k > 0 && top_k < V && top_k <= chunks) {
      sorted.assign(chunk_max.begin(), chunk_max.end());
      std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
      floor = sorted[top_k - 1];
    }
    gather(chunks, floor);
    if (top_k > 0 && top_k < V) {
      if (static_cast<int64_t>(keep.size()) >= top_k) {  // else fewer than k finite values: all stay
        sorted.assign(keep_v.begin(), keep_v.end());
        std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
        thr = sorted[top_k - 1];
        narrow();
      }
    }
    if (top_p < 1.0) {
      sorted.assign(keep_v.begin(), keep_v.end());
      std::sort(sorted.begin(), sorted.end(), std::greater<float>());
      double zk = 0.0;
      for (float v : sorted) zk += std::exp(double(v) - max);
      // top-p keeps x iff the mass strictly above x is < top_p (HF: ascending cumsum > 1 - top_p).
      double above = 0.0;
      float last_kept = sorted[0];
      const int64_t m = static_cast<int64_t>(sorted.size());
      for (int64_t i = 0; i < m && above < top_p;) {
        const float v = sorted[i];
        last_kept = v;
        int64_t j = i;
        while (j < m && sorted[j] == v) ++j;
        above += double(j - i) * std::exp(double(v) - max) / zk;
        i = j;
      }
      if (last_kept > thr) {
        thr = last_kept;
        narrow();
      }
    }
    // Z summed in index order over the kept tokens: the same sum as over all V with zeros skipped.
    w.resize(keep.size());
    for (size_t i = 0; i < keep.size(); ++i) {
      w[i] = std::exp(double(keep_v[i]) - max);
      Z += w[i];
    }
  }

  // keep = {x : s_x >= floor, s_x > -inf} in index order (with their values), visiting only chunks
  // whose maximum reaches floor.
  void gather(int64_t chunks, float floor) {
    keep.clear();
    keep_v.clear();
    for (int64_t c = 0; c < chunks; ++c) {
      if (!(chunk_max[c] >= floor) || chunk_max[c] == kNegInf) continue;
      for (int64_t x = c * kScanChunk, e = std::min(V, x + kScanChunk); x < e; ++x) {
        const float v = s(x);
        if (v >= floor && v > kNegInf) {
          keep.push_back(x);
          keep_v.push_back(v);
        }
      }
    }
  }

  // Drops the kept tokens below thr (order kept).
  void narrow() {
    size_t n = 0;
    for (size_t i = 0; i < keep.size(); ++i) {
      if (keep_v[i] >= thr) {
        keep[n] = keep[i];
        keep_v[n++] = keep_v[i];
      }
    }
    keep.resize(n);
    keep_v.resize(n);
  }

  double prob(int64_t x) const {
    if (!valid || x < 0 || x >= V) return 0.0;
    const float v = s(x);
    return v < thr ? 0.0 : std::exp(double(v) - max) / Z;
  }

  // The most likely token of the processed distribution (first of ties; NaN logits count as -inf).
  int64_t mode() const {
    int64_t best = 0;
    for (int64_t x = 1; x < V; ++x)
      if (s(x) > s(best)) best = x;
    return best;
  }
};

// One per thread, kept across calls (no allocation per step). Not inlined, so that the hot loops see a
// plain reference instead of re-deriving the thread-local address (__tls_get_addr) on every access.
template <typename T>
__attribute__((noinline)) NodeDist<T>& thread_dist() {
  thread_local NodeDist<T> d;
  return d;
}

// First kept token (index order) whose running sum of the residual weight exceeds u * total, skipping the
// rejected tokens; -1 when nothing is left. Weights are exp(s - max) (the 1 / Z cancels in the ratio).
template <typename T>
int64_t sample_residual(const NodeDist<T>& d, double u, const std::vector<int64_t>& rejected) {
  const auto is_rejected = [&](int64_t x) { return std::find(rejected.begin(), rejected.end(), x) != rejected.end(); };
  double total = 0.0;
  for (size_t i = 0; i < d.keep.size(); ++i)
    if (!is_rejected(d.keep[i])) total += d.w[i] / d.Z;
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double cum = 0.0;
  int64_t last_pos = -1;
  for (size_t i = 0; i < d.keep.size(); ++i) {
    if (!(d.w[i] > 0.0) || is_rejected(d.keep[i])) continue;  // (exp underflowed: probability 0, never drawn)
    cum += d.w[i] / d.Z;
    last_pos = d.keep[i];
    if (cum > target) return d.keep[i];  // strict: u = 0 never lands on a zero-probability token
  }
  return last_pos;  // rounding left the target just above the sum
}

// First token in index order whose running sum of r exceeds u * sum(r), among
// tokens with r > 0; nullopt-like -1 when r is zero everywhere.
template <typename R>
int64_t sample_inverse_cdf(int64_t V, double u, R&& r) {
  double total = 0.0;
  for (int64_t x = 0; x < V; ++x) total += r(x);
  if (!(total > 0.0)) return -1;
  const double target = u * total;
  double cum = 0.0;
  int64_t last_pos = -1;
  for (int64_t x = 0; x < V; ++x) {
    const double w = r(x);
    if (w <= 0.0) continue;
    cum += w;
    last_pos = x;
    if (cum > target) return x;  // strict: u = 0 never lands on a zero-probability token
  }
  return last_pos;  // rounding left the target just above the sum
}

template <typename T>
void verify_sampling_kernel(const at::Tensor& logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
                            const at::Tensor& uniforms, float temperature, int64_t top_k, double top_p,
                            at::Tensor& path, at::Tensor& alen, at::Tensor& bonus) {
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2), P = path.size(1);
  const T* lg = logits.data_ptr<T>();
  const int64_t* tok = draft_tokens.data_ptr<int64_t>();
  const int64_t* par = parents.data_ptr<int64_t>();
  const double* uni = uniforms.data_ptr<double>();
  int64_t* pp = path.data_ptr<int64_t>();
  int64_t* al = alen.data_ptr<int64_t>();
  int64_t* bo = bonus.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    NodeDist<T>& dist = thread_dist<T>();
    std::vector<int64_t> rejected;
    for (int64_t b = begin; b < end; ++b) {
      int64_t cur = 0, n_acc = 0;
      pp[b * P] = 0;
      dist.build(lg + (b * N) * V, V, temperature, top_k, top_p);
      rejected.clear();
      while (dist.valid && n_acc < P - 1) {
        double mass = 1.0;  // probability left after zeroing the rejected siblings
        int64_t next = -1;
        for (int64_t j = cur + 1; j < N; ++j) {
          if (par[b * N + j] != cur) continue;
          const int64_t t = tok[b * N + j];
          const bool seen = std::find(rejected.begin(), rejected.end(), t) != rejected.end();
          const double p = seen ? 0.0 : dist.prob(t);
          // Accept with probability p / mass (the residual-renormalised target). Strict, and p > 0 is
          // required too, so neither a uniform of 0 nor a mass driven below 0 by rounding accepts p = 0.
          if (p > 0.0 && uni[b * N + j] * mass < p) {
            next = j;
            break;
          }
          mass = std::max(mass - p, 0.0);
          rejected.push_back(t);
        }
        if (next < 0) break;
        pp[b * P + ++n_acc] = next;
        cur = next;
        rejected.clear();
        dist.build(lg + (b * N + cur) * V, V, temperature, top_k, top_p);
      }
      for (int64_t i = n_acc + 1; i < P; ++i) pp[b * P + i] = -1;
      al[b] = n_acc;
      if (!dist.valid) {
        bo[b] = 0;  // no finite logit at this node: nothing can be sampled
        continue;
      }
      // The bonus uses its own uniform (slot 0: the root is never tested), never a reused acceptance coin.
      int64_t x = sample_residual(dist, uni[b * N], rejected);
      // No residual mass left (possible only through rounding): the most likely token, as on CUDA.
      if (x < 0) x = dist.mode();
      bo[b] = x;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cpu(const at::Tensor& target_logits,
                                                                   const at::Tensor& draft_tokens,
                                                                   const at::Tensor& parents,
                                                                   const at::Tensor& uniforms, double temperature,
                                                                   int64_t top_k, double top_p, int64_t max_accept) {
  check_verify(target_logits, draft_tokens, parents, max_accept);
  const int64_t B = target_logits.size(0), N = target_logits.size(1);
  check_uniforms(uniforms, target_logits, B, N);
  check_sampling_params(temperature, top_k, top_p);
  check_verify_values(draft_tokens, parents, target_logits.size(2));
  check_uniform_values(uniforms);
  auto opts = draft_tokens.options();
  at::Tensor path = at::empty({B, max_accept + 1}, opts), alen = at::empty({B}, opts), bonus = at::empty({B}, opts);
  dispatch_float(target_logits.scalar_type(), "verify_sampling", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    verify_sampling_kernel<T>(target_logits, draft_tokens, parents, uniforms, static_cast<float>(temperature), top_k,
                              top_p, path, alen, bonus);
  });
  return {path, alen, bonus};
}

// ---------------------------------------------------------------------------
// Chain speculative sampling (stochastic drafts)
// ---------------------------------------------------------------------------
template <typename T>
void chain_kernel(const at::Tensor& draft_probs, const at::Tensor& draft_tokens, const at::Tensor& target_probs,
                  const at::Tensor& uniforms, at::Tensor& tokens, at::Tensor& alen) {
  const int64_t B = draft_probs.size(0), K = draft_probs.size(1), V = draft_probs.size(2);
  const T* qp = draft_probs.data_ptr<T>();
  const T* pp = target_probs.data_ptr<T>();
  const int64_t* dt = draft_tokens.data_ptr<int64_t>();
  const double* uni = uniforms.data_ptr<double>();
  int64_t* out = tokens.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t i = 0;
      for (; i < K; ++i) {
        const int64_t x = dt[b * K + i];
        const double q = double(qp[(b * K + i) * V + x]);
        const double p = double(pp[(b * (K + 1) + i) * V + x]);
        // Accept with probability min(1, p / q): q <= p always accepts, p = 0 never does.
        if (!(uni[b * (K + 1) + i] * q < p)) break;
        out[b * (K + 1) + i] = x;
      }
      const T* prow = pp + (b * (K + 1) + i) * V;
      const double u = uni[b * (K + 1) + K];  // a fresh uniform, not the rejected token's coin
      int64_t x = -1;
      if (i < K) {
        const T* qrow = qp + (b * K + i) * V;
        x = sample_inverse_cdf(V, u, [&](int64_t y) { return std::max(double(prow[y]) - double(qrow[y]), 0.0); });
      }
      if (x < 0) x = sample_inverse_cdf(V, u, [&](int64_t y) { return std::max(double(prow[y]), 0.0); });
      if (x < 0) x = dt[b * K + std::min(i, K - 1)];  // target row is all zeros: nothing better exists
      out[b * (K + 1) + i] = x;
      for (int64_t j = i + 1; j <= K; ++j) out[b * (K + 1) + j] = -1;
      alen.data_ptr<int64_t>()[b] = i;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> chain_speculative_sampling_cpu(const at::Tensor& draft_probs,
                                                                  const at::Tensor& draft_tokens,
                                                                  const at::Tensor& target_probs,
                                                                  const at::Tensor& uniforms) {
  check_chain(draft_probs, draft_tokens, target_probs);
  const int64_t B = draft_probs.size(0), K = draft_probs.size(1), V = draft_probs.size(2);
  check_uniforms(uniforms, draft_probs, B, K + 1);
  check_uniform_values(uniforms);
  const int64_t* dt = draft_tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * K; ++i) {
    TORCH_CHECK(dt[i] >= 0 && dt[i] < V, "draft_tokens[", i / K, ", ", i % K, "]=", dt[i],
                " is outside the vocabulary [0, ", V, ")");
  }
  auto opts = draft_tokens.options();
  at::Tensor tokens = at::empty({B, K + 1}, opts), alen = at::empty({B}, opts);
  dispatch_float(draft_probs.scalar_type(), "chain_speculative_sampling", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    chain_kernel<T>(draft_probs, draft_tokens, target_probs, uniforms, tokens, alen);
  });
  return {tokens, alen};
}

}  // namespace
}  // namespace cpu
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CPU, m) {
  m.impl("verify_greedy", &vispec::cpu::verify_greedy_cpu);
  m.impl("verify_sampling", &vispec::cpu::verify_sampling_cpu);
  m.impl("chain_speculative_sampling", &vispec::cpu::chain_speculative_sampling_cpu);
}
