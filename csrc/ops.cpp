// Op schemas (one place) and the Python extension module vispec._C.
// CPU implementations register in csrc/cpu/*.cpp, CUDA ones in
// csrc/cuda/torch_glue.cpp, fake (meta) ones in vispec/ops.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/common.h"

#ifndef VISPEC_WITH_CUDA
#define VISPEC_WITH_CUDA 0
#endif

TORCH_LIBRARY(vispec, m) {
  // out (B, N, Hq, D); lse (B, N, Hq) float32, or shape (0,) when not requested.
  // window > 0: sliding-window attention (prefix key k visible to a node at position p iff p - k < window).
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, "
      "Tensor tree_mask, float scale, bool return_lse, int window=0) -> (Tensor, Tensor)");
  // accept_path (B, max_accept + 1), accept_len (B,), bonus_token (B,); all int64.
  m.def(
      "verify_greedy(Tensor target_logits, Tensor draft_tokens, Tensor parents, "
      "int max_accept) -> (Tensor, Tensor, Tensor)");
  m.def(
      "verify_sampling(Tensor target_logits, Tensor draft_tokens, Tensor parents, "
      "Tensor uniforms, float temperature, int top_k, float top_p, int max_accept) "
      "-> (Tensor, Tensor, Tensor)");
  // tokens (B, K + 1) int64 (-1 padded), accept_len (B,) int64.
  m.def(
      "chain_speculative_sampling(Tensor draft_probs, Tensor draft_tokens, "
      "Tensor target_probs, Tensor uniforms) -> (Tensor, Tensor)");
  // y (M, N) = x (M, K) @ weight (N, K)^T + bias (N,): fp32, CPU; each row's result independent of M.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // In place on every layer's K and V cache.
  m.def(
      "compact_kv_(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cache_lens, "
      "Tensor accept_path, Tensor accept_len) -> ()");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vispec custom ops; they are registered as torch.ops.vispec.* when this module loads";
  m.def("cuda_built", []() { return static_cast<bool>(VISPEC_WITH_CUDA); },
        "Whether this build contains the CUDA kernels.");
  m.def("cpu_has_avx512", []() {
#ifdef VISPEC_HAVE_AVX512
    return vispec::cpu::cpu_has_avx512();
#else
    return false;
#endif
  }, "Whether the CPU kernels take their AVX-512 bodies (not with VISPEC_NO_AVX512=1).");
}
