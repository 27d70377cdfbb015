// Input validation shared by the CPU and CUDA implementations of every op.
// Each check raises a c10::Error (ValueError/RuntimeError in Python) that names
// the argument and the expected shape / dtype / device, before any work is done.
// Checks of tensor *values* (index ranges) need the data on the host, so the
// CUDA path does not run them (the kernels are written to stay in bounds on any
// input); call the check_*_values functions for CPU tensors.
#pragma once

#include <ATen/ATen.h>

namespace vispec {

// q (B, N, Hq, D); k_cache, v_cache (B, Hkv, S_max, D); cache_lens (B,) int64;
// tree_mask (Bm, N, ceil(N/32)) int32 with Bm in {1, B}.
void check_tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cache_lens, const at::Tensor& tree_mask, int64_t window = 0);
void check_tree_attention_values(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& cache_lens);

// target_logits (B, N, V) float; draft_tokens, parents (B, N) int64;
// 0 <= max_accept <= N - 1.
void check_verify(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                  const at::Tensor& parents, int64_t max_accept);
void check_verify_values(const at::Tensor& draft_tokens, const at::Tensor& parents, int64_t vocab);
// uniforms (B, n) float64 on the same device.
void check_uniforms(const at::Tensor& uniforms, const at::Tensor& like, int64_t batch, int64_t n);
void check_uniform_values(const at::Tensor& uniforms);
void check_sampling_params(double temperature, int64_t top_k, double top_p);

// draft_probs (B, K, V); draft_tokens (B, K) int64; target_probs (B, K+1, V).
void check_chain(const at::Tensor& draft_probs, const at::Tensor& draft_tokens,
                 const at::Tensor& target_probs);

// k_caches, v_caches: L tensors (B, H, S_max, D) of one dtype/device/shape/strides;
// cache_lens (B,), accept_path (B, P), accept_len (B,) int64.
void check_compact(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& cache_lens,
                   const at::Tensor& accept_path, const at::Tensor& accept_len);
void check_compact_values(const at::Tensor& cache_lens, const at::Tensor& accept_path,
                          const at::Tensor& accept_len, int64_t max_seq);

// x (M, K), weight (N, K) float32 on the CPU, each contiguous in its last dimension; bias (N,) or none.
void check_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace vispec
