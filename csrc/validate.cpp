#include "validate.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <cmath>
#include <sstream>

namespace vispec {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_index(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", shape_str(t));
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), " like the other inputs, got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device(), "; all inputs must be on one device");
}

}  // namespace

void check_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cache_lens, const at::Tensor& tree_mask, int64_t window) {
  TORCH_CHECK(q.dim() == 4, "q must have shape (B, N, Hq, D), got ", shape_str(q));
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must have shape (B, Hkv, S_max, D), got ", shape_str(k_cache));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", shape_str(k_cache),
              ", got ", shape_str(v_cache));
  check_float(q, "q");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "k_cache and v_cache must have the dtype of q (", q.scalar_type(), "), got ", k_cache.scalar_type(),
              " and ", v_cache.scalar_type());
  check_same_device(k_cache, "k_cache", q, "q");
  check_same_device(v_cache, "v_cache", q, "q");
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(B > 0 && N > 0 && Hq > 0 && D > 0, "q must have non-zero sizes, got ", shape_str(q));
  TORCH_CHECK(k_cache.size(0) == B, "k_cache batch size ", k_cache.size(0), " does not match q's ", B);
  TORCH_CHECK(k_cache.size(3) == D, "k_cache head_dim ", k_cache.size(3), " does not match q's ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q's head count ", Hq, " must be a multiple of the cache's ", Hkv,
              " kv heads");
  TORCH_CHECK(S >= N, "the cache holds S_max=", S, " positions, fewer than the N=", N, " tree tokens");
  // q may be any view whose head_dim is contiguous (the (B, Hq, N, D) -> (B, N, Hq, D) transpose that
  // attention modules hold): the kernels take its strides.
  TORCH_CHECK(q.stride(3) == 1, "q must be contiguous in the last (head_dim) dimension");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "k_cache and v_cache must be contiguous in the last (head_dim) dimension");
  check_index(cache_lens, "cache_lens", {B}, q);
  TORCH_CHECK(tree_mask.scalar_type() == at::kInt,
              "tree_mask must be the bit-packed int32 mask (vispec.ops.pack_tree_mask packs a bool mask), got ",
              tree_mask.scalar_type());
  const int64_t W = (N + 31) / 32;
  TORCH_CHECK(tree_mask.dim() == 3 && (tree_mask.size(0) == 1 || tree_mask.size(0) == B) &&
                  tree_mask.size(1) == N && tree_mask.size(2) == W,
              "tree_mask must have shape (", B, " or 1, ", N, ", ", W, "), got ", shape_str(tree_mask));
  check_same_device(tree_mask, "tree_mask", q, "q");
  TORCH_CHECK(tree_mask.is_contiguous(), "tree_mask must be contiguous");
  // A node's depth is its mask row's bit count - 1 (< N), so every tree key of a node lies inside the window.
  TORCH_CHECK(window == 0 || window >= N, "window must be 0 (none) or at least the N=", N,
              " tree nodes, got ", window);
}

void check_tree_attention_values(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& cache_lens) {
  const int64_t N = q.size(1), S = k_cache.size(2);
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < cache_lens.numel(); ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] + N <= S, "cache_lens[", b, "]=", lens[b],
                " is out of range: the prefix plus N=", N, " tree tokens must fit the cache's S_max=", S);
  }
}

void check_verify(const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
                  int64_t max_accept) {
  TORCH_CHECK(target_logits.dim() == 3, "target_logits must have shape (B, N, V), got ", shape_str(target_logits));
  check_float(target_logits, "target_logits");
  TORCH_CHECK(target_logits.is_contiguous(), "target_logits must be contiguous");
  const int64_t B = target_logits.size(0), N = target_logits.size(1), V = target_logits.size(2);
  TORCH_CHECK(B > 0 && N > 0 && V > 0, "target_logits must have non-zero sizes, got ", shape_str(target_logits));
  check_index(draft_tokens, "draft_tokens", {B, N}, target_logits);
  check_index(parents, "parents", {B, N}, target_logits);
  TORCH_CHECK(max_accept >= 0 && max_accept <= N - 1, "max_accept must be in [0, N-1] = [0, ", N - 1, "], got ",
              max_accept);
}

void check_verify_values(const at::Tensor& draft_tokens, const at::Tensor& parents, int64_t vocab) {
  const int64_t B = parents.size(0), N = parents.size(1);
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* tok = draft_tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(par[b * N] == -1, "parents[", b, ", 0] must be -1 (node 0 is the root), got ", par[b * N]);
    for (int64_t i = 1; i < N; ++i) {
      const int64_t p = par[b * N + i];
      TORCH_CHECK(p >= 0 && p < i, "parents[", b, ", ", i, "]=", p,
                  " is invalid: a node's parent must come before it (0 <= parent < ", i, ")");
    }
    for (int64_t i = 0; i < N; ++i) {
      const int64_t t = tok[b * N + i];
      TORCH_CHECK(t >= 0 && t < vocab, "draft_tokens[", b, ", ", i, "]=", t, " is outside the vocabulary [0, ",
                  vocab, ")");
    }
  }
}

void check_uniforms(const at::Tensor& uniforms, const at::Tensor& like, int64_t batch, int64_t n) {
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble, "uniforms must be float64, got ", uniforms.scalar_type());
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == batch && uniforms.size(1) == n,
              "uniforms must have shape (", batch, ", ", n, "), got ", shape_str(uniforms));
  check_same_device(uniforms, "uniforms", like, "the probabilities");
  TORCH_CHECK(uniforms.is_contiguous(), "uniforms must be contiguous");
}

void check_uniform_values(const at::Tensor& uniforms) {
  const double* u = uniforms.data_ptr<double>();
  for (int64_t i = 0; i < uniforms.numel(); ++i) {
    TORCH_CHECK(u[i] >= 0.0 && u[i] < 1.0, "uniforms must lie in [0, 1), got ", u[i], " at flat index ", i);
  }
}

void check_sampling_params(double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature),
              "temperature must be a finite number > 0 for sampling (use verify_greedy for temperature 0), got ",
              temperature);
  TORCH_CHECK(top_k >= 0, "top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1] (1 disables it), got ", top_p);
}

void check_chain(const at::Tensor& draft_probs, const at::Tensor& draft_tokens, const at::Tensor& target_probs) {
  TORCH_CHECK(draft_probs.dim() == 3, "draft_probs must have shape (B, K, V), got ", shape_str(draft_probs));
  check_float(draft_probs, "draft_probs");
  const int64_t B = draft_probs.size(0), K = draft_probs.size(1), V = draft_probs.size(2);
  TORCH_CHECK(B > 0 && K > 0 && V > 0, "draft_probs must have non-zero sizes, got ", shape_str(draft_probs));
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == K + 1 &&
                  target_probs.size(2) == V,
              "target_probs must have shape (", B, ", ", K + 1, ", ", V, "), got ", shape_str(target_probs));
  TORCH_CHECK(target_probs.scalar_type() == draft_probs.scalar_type(), "target_probs must have the dtype of draft_probs (",
              draft_probs.scalar_type(), "), got ", target_probs.scalar_type());
  check_same_device(target_probs, "target_probs", draft_probs, "draft_probs");
  TORCH_CHECK(draft_probs.is_contiguous() && target_probs.is_contiguous(),
              "draft_probs and target_probs must be contiguous");
  check_index(draft_tokens, "draft_tokens", {B, K}, draft_probs);
}

void check_compact(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& cache_lens,
                   const at::Tensor& accept_path, const at::Tensor& accept_len) {
  TORCH_CHECK(k_caches.size() == v_caches.size(), "k_caches and v_caches must list the same number of layers, got ",
              k_caches.size(), " and ", v_caches.size());
  TORCH_CHECK(accept_path.dim() == 2, "accept_path must have shape (B, P), got ", shape_str(accept_path));
  const int64_t B = accept_path.size(0);
  if (k_caches.empty()) return;
  const at::Tensor& ref = k_caches[0];
  TORCH_CHECK(ref.dim() == 4, "k_caches[0] must have shape (B, H, S_max, D), got ", shape_str(ref));
  TORCH_CHECK(ref.size(0) == B, "k_caches[0] batch size ", ref.size(0), " does not match accept_path's ", B);
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kHalf || ref.scalar_type() == at::kBFloat16,
              "caches must be float32, float16 or bfloat16, got ", ref.scalar_type());
  TORCH_CHECK(ref.stride(3) == 1, "caches must be contiguous in the last (head_dim) dimension");
  for (size_t l = 0; l < k_caches.size(); ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const at::Tensor& t = kv == 0 ? k_caches[l] : v_caches[l];
      const char* name = kv == 0 ? "k_caches" : "v_caches";
      TORCH_CHECK(t.sizes() == ref.sizes(), name, "[", l, "] has shape ", shape_str(t),
                  ", expected the shape of k_caches[0] ", shape_str(ref));
      TORCH_CHECK(t.strides() == ref.strides(), name, "[", l, "] has strides ", t.strides(),
                  ", expected the strides of k_caches[0] ", ref.strides());
      TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, "[", l, "] has dtype ", t.scalar_type(),
                  ", expected ", ref.scalar_type());
      TORCH_CHECK(t.device() == ref.device(), name, "[", l, "] is on ", t.device(), ", expected ", ref.device());
    }
  }
  // Compaction writes every cache in place: two entries sharing memory (one tensor listed for two layers,
  // K given as V, an expanded view with stride 0) would be moved twice. Host-side pointer checks, no sync.
  std::vector<std::pair<const void*, std::string>> starts;
  starts.reserve(2 * k_caches.size());
  for (size_t l = 0; l < k_caches.size(); ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const at::Tensor& t = kv == 0 ? k_caches[l] : v_caches[l];
      const std::string name = std::string(kv == 0 ? "k_caches[" : "v_caches[") + std::to_string(l) + "]";
      TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                  " has overlapping elements (a stride of 0?): compaction writes each cache in place");
      starts.emplace_back(t.data_ptr(), name);
    }
  }
  std::sort(starts.begin(), starts.end());
  for (size_t i = 1; i < starts.size(); ++i) {
    TORCH_CHECK(starts[i].first != starts[i - 1].first, starts[i - 1].second, " and ", starts[i].second,
                " are the same memory: every layer's K and V must be a cache of its own");
  }
  check_index(cache_lens, "cache_lens", {B}, ref);
  check_index(accept_path, "accept_path", {B, accept_path.size(1)}, ref);
  check_index(accept_len, "accept_len", {B}, ref);
  TORCH_CHECK(accept_path.size(1) >= 1, "accept_path must have at least one column (the root)");
}

void check_compact_values(const at::Tensor& cache_lens, const at::Tensor& accept_path, const at::Tensor& accept_len,
                          int64_t max_seq) {
  const int64_t B = accept_path.size(0), P = accept_path.size(1);
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  const int64_t* path = accept_path.data_ptr<int64_t>();
  const int64_t* alen = accept_len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(alen[b] >= 0 && alen[b] < P, "accept_len[", b, "]=", alen[b], " must be in [0, ", P - 1, "]");
    TORCH_CHECK(path[b * P] == 0, "accept_path[", b, ", 0] must be 0 (the root), got ", path[b * P]);
    for (int64_t i = 1; i <= alen[b]; ++i) {
      TORCH_CHECK(path[b * P + i] > path[b * P + i - 1], "accept_path[", b, "] must be strictly increasing over its ",
                  alen[b] + 1, " accepted entries (parents precede children), got ", path[b * P + i], " after ",
                  path[b * P + i - 1]);
    }
    const int64_t last = path[b * P + alen[b]];
    TORCH_CHECK(lens[b] >= 0 && lens[b] + last < max_seq, "cache_lens[", b, "]=", lens[b], " with accepted node ",
                last, " points past the cache's S_max=", max_seq);
  }
}

void check_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must have shape (M, K), got ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2, "weight must have shape (N, K), got ", shape_str(weight));
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be on the CPU, got ", x.device(),
              " and ", weight.device());
  TORCH_CHECK(weight.size(1) == x.size(1), "weight has ", weight.size(1), " input features but x has ", x.size(1));
  TORCH_CHECK(x.stride(1) == 1 && weight.stride(1) == 1, "x and weight must be contiguous in their last dimension");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (", weight.size(0),
                "), got ", shape_str(*bias));
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias must be float32, got ", bias->scalar_type());
    check_same_device(*bias, "bias", x, "x");
    TORCH_CHECK(bias->is_contiguous(), "bias must be contiguous");
  }
}

}  // namespace vispec
