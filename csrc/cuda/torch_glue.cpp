// CUDA implementations of the vispec ops: validate, allocate outputs, fill the
// torch-free params structs of vispec/launchers.h and launch on the current
// stream. This is the only CUDA-side file that includes torch headers. Only c10/cuda
// headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "validate.h"
#include "vispec/launchers.h"

namespace vispec {
namespace {

cuda::DType to_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
  return cuda::DType::kFloat32;  // unreachable
}

at::TensorOptions int64_opts(const at::Tensor& like) { return like.options().dtype(at::kLong); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// SM count of the current device (the CUDAGuard has made it current).
int current_num_sms() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                       const at::Tensor& tree_mask, double scale, bool return_lse,
                                                       int64_t window) {
  check_tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, window);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK(cuda::tree_attention_supports_head_dim(D), "vispec.tree_attention (CUDA): head_dim ", D,
              " is not supported; supported head dims: 64, 80, 96, 128, 256");

  at::Tensor out = at::empty({B, N, Hq, D}, q.options());  // contiguous
  at::Tensor lse = return_lse ? at::empty({B, N, Hq}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  cuda::TreeAttentionParams p{};
  p.q = q.const_data_ptr();
  p.k_cache = k_cache.const_data_ptr();
  p.v_cache = v_cache.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = return_lse ? lse.mutable_data_ptr<float>() : nullptr;
  p.cache_lens = cache_lens.const_data_ptr<int64_t>();
  p.tree_mask = tree_mask.const_data_ptr<int32_t>();
  p.batch = B;
  p.n_tree = N;
  p.num_q_heads = Hq;
  p.num_kv_heads = k_cache.size(1);
  p.head_dim = D;
  p.max_seq = k_cache.size(2);
  // A mask with one batch row is shared by every row of the batch.
  p.mask_batch_stride = tree_mask.size(0) == 1 ? 0 : tree_mask.stride(0);
  p.mask_words = tree_mask.size(2);
  p.q_stride_b = q.stride(0);
  p.q_stride_n = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_s = k_cache.stride(2);
  p.v_stride_b = v_cache.stride(0);
  p.v_stride_h = v_cache.stride(1);
  p.v_stride_s = v_cache.stride(2);
  p.scale = static_cast<float>(scale);
  p.window = window;
  p.dtype = to_dtype(q.scalar_type(), "vispec.tree_attention");

  const int num_sms = current_num_sms();
  const int num_splits = cuda::tree_attention_num_splits(p, num_sms);
  const size_t ws_bytes = cuda::tree_attention_workspace_bytes(p, num_splits);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
    p.workspace = workspace.mutable_data_ptr();
  }
  C10_CUDA_CHECK(cuda::tree_attention(p, num_splits, current_stream()));
  return {out, lse};
}

// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& target_logits,
                                                                  const at::Tensor& draft_tokens,
                                                                  const at::Tensor& parents, int64_t max_accept) {
  check_verify(target_logits, draft_tokens, parents, max_accept);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const int64_t B = target_logits.size(0), N = target_logits.size(1), V = target_logits.size(2);
  const at::TensorOptions opts = int64_opts(target_logits);
  at::Tensor accept_path = at::empty({B, max_accept + 1}, opts);
  at::Tensor accept_len = at::empty({B}, opts);
  at::Tensor bonus = at::empty({B}, opts);
  if (B == 0) return {accept_path, accept_len, bonus};
  cuda::VerifyGreedyParams p{};
  p.logits = target_logits.const_data_ptr();
  p.draft_tokens = draft_tokens.const_data_ptr<int64_t>();
  p.parents = parents.const_data_ptr<int64_t>();
  p.accept_path = accept_path.mutable_data_ptr<int64_t>();
  p.accept_len = accept_len.mutable_data_ptr<int64_t>();
  p.bonus_token = bonus.mutable_data_ptr<int64_t>();
  p.batch = B;
  p.n_tree = N;
  p.vocab = V;
  p.path_width = max_accept + 1;
  p.dtype = to_dtype(target_logits.scalar_type(), "vispec.verify_greedy");
  p.num_splits = cuda::verify_greedy_num_splits(p, current_num_sms());
  at::Tensor argmax_ws = at::empty({B, N, p.num_splits}, opts);
  p.argmax_ws = argmax_ws.mutable_data_ptr<int64_t>();
  C10_CUDA_CHECK(cuda::verify_greedy(p, current_stream()));
  return {accept_path, accept_len, bonus};
}

// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p, int64_t max_accept) {
  check_verify(target_logits, draft_tokens, parents, max_accept);
  const int64_t B = target_logits.size(0), N = target_logits.size(1), V = target_logits.size(2);
  check_uniforms(uniforms, target_logits, B, N);
  check_sampling_params(temperature, top_k, top_p);
  // The kernel remembers up to 1024 rejected siblings per node in shared memory.
  TORCH_CHECK(N <= 1025, "vispec.verify_sampling (CUDA): trees of at most 1025 nodes are supported, got N=", N);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const at::TensorOptions opts = int64_opts(target_logits);
  at::Tensor accept_path = at::empty({B, max_accept + 1}, opts);
  at::Tensor accept_len = at::empty({B}, opts);
  at::Tensor bonus = at::empty({B}, opts);
  if (B == 0) return {accept_path, accept_len, bonus};

  cuda::VerifySamplingParams p{};
  p.logits = target_logits.const_data_ptr();
  p.draft_tokens = draft_tokens.const_data_ptr<int64_t>();
  p.parents = parents.const_data_ptr<int64_t>();
  p.uniforms = uniforms.const_data_ptr<double>();
  p.accept_path = accept_path.mutable_data_ptr<int64_t>();
  p.accept_len = accept_len.mutable_data_ptr<int64_t>();
  p.bonus_token = bonus.mutable_data_ptr<int64_t>();
  p.batch = B;
  p.n_tree = N;
  p.vocab = V;
  p.path_width = max_accept + 1;
  p.temperature = static_cast<float>(temperature);
  p.top_k = top_k;
  p.top_p = top_p;
  p.dtype = to_dtype(target_logits.scalar_type(), "vispec.verify_sampling");
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::verify_sampling_workspace_bytes(p))},
                                   target_logits.options().dtype(at::kByte));
  p.workspace = workspace.mutable_data_ptr();
  C10_CUDA_CHECK(cuda::verify_sampling(p, current_stream()));
  return {accept_path, accept_len, bonus};
}

// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> chain_speculative_sampling_cuda(const at::Tensor& draft_probs,
                                                                   const at::Tensor& draft_tokens,
                                                                   const at::Tensor& target_probs,
                                                                   const at::Tensor& uniforms) {
  check_chain(draft_probs, draft_tokens, target_probs);
  const int64_t B = draft_probs.size(0), K = draft_probs.size(1), V = draft_probs.size(2);
  check_uniforms(uniforms, draft_probs, B, K + 1);
  const c10::cuda::CUDAGuard guard(draft_probs.device());
  const at::TensorOptions opts = int64_opts(draft_probs);
  at::Tensor tokens = at::empty({B, K + 1}, opts);
  at::Tensor accept_len = at::empty({B}, opts);
  if (B == 0) return {tokens, accept_len};

  cuda::ChainSamplingParams p{};
  p.draft_probs = draft_probs.const_data_ptr();
  p.draft_tokens = draft_tokens.const_data_ptr<int64_t>();
  p.target_probs = target_probs.const_data_ptr();
  p.uniforms = uniforms.const_data_ptr<double>();
  p.tokens = tokens.mutable_data_ptr<int64_t>();
  p.accept_len = accept_len.mutable_data_ptr<int64_t>();
  p.batch = B;
  p.num_spec = K;
  p.vocab = V;
  p.dtype = to_dtype(draft_probs.scalar_type(), "vispec.chain_speculative_sampling");
  C10_CUDA_CHECK(cuda::chain_speculative_sampling(p, current_stream()));
  return {tokens, accept_len};
}

// ---------------------------------------------------------------------------
void compact_kv_cuda(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& cache_lens,
                     const at::Tensor& accept_path, const at::Tensor& accept_len) {
  check_compact(k_caches, v_caches, cache_lens, accept_path, accept_len);
  if (k_caches.empty()) return;
  const at::Tensor& k0 = k_caches[0];
  if (k0.numel() == 0 || accept_path.size(1) <= 1) return;  // nothing to move
  const c10::cuda::CUDAGuard guard(k0.device());
  const cudaStream_t stream = current_stream();

  cuda::CompactKVParams p{};
  p.cache_lens = cache_lens.const_data_ptr<int64_t>();
  p.accept_path = accept_path.const_data_ptr<int64_t>();
  p.accept_len = accept_len.const_data_ptr<int64_t>();
  p.batch = k0.size(0);
  p.num_heads = k0.size(1);
  p.max_seq = k0.size(2);
  p.head_dim = k0.size(3);
  p.path_width = accept_path.size(1);
  // check_compact guarantees identical shapes / strides / dtype for every layer, K and V.
  p.stride_b = k0.stride(0);
  p.stride_h = k0.stride(1);
  p.stride_s = k0.stride(2);
  p.elem_bytes = static_cast<int64_t>(k0.element_size());

  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  for (int64_t first = 0; first < num_layers; first += cuda::kMaxCompactLayers) {
    const int64_t count = std::min<int64_t>(cuda::kMaxCompactLayers, num_layers - first);
    for (int64_t l = 0; l < count; ++l) {
      p.k[l] = k_caches[first + l].mutable_data_ptr();
      p.v[l] = v_caches[first + l].mutable_data_ptr();
    }
    p.num_layers = static_cast<int>(count);
    C10_CUDA_CHECK(cuda::compact_kv(p, stream));
  }
}

}  // namespace
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CUDA, m) {
  m.impl("tree_attention", &vispec::tree_attention_cuda);
  m.impl("verify_greedy", &vispec::verify_greedy_cuda);
  m.impl("verify_sampling", &vispec::verify_sampling_cuda);
  m.impl("chain_speculative_sampling", &vispec::chain_speculative_sampling_cuda);
  m.impl("compact_kv_", &vispec::compact_kv_cuda);
}
