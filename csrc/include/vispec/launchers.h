// Torch-free interface between the op glue (csrc/cuda/torch_glue.cpp) and the
// CUDA kernels (csrc/cuda/*.cu). Everything here is plain C++: raw pointers,
// sizes, strides in elements and a cudaStream_t, so every .cu file compiles with
// nvcc alone, on a machine without a GPU or a CUDA build of torch.
//
// Conventions shared by all ops (see README "Op API"):
//   * Tree of N nodes per batch row; node 0 is the root (the last accepted token,
//     not yet in the target cache); parents[b, i] < i for i > 0, parents[b, 0] = -1.
//   * The N tree tokens' K/V sit at cache positions cache_lens[b] .. cache_lens[b]+N-1.
//   * accept_path[b, :] lists accepted node indices, starting with 0, padded with -1;
//     accept_len[b] counts accepted draft nodes (the root excluded).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace vispec {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------
// Tree attention
// ---------------------------------------------------------------------------
struct TreeAttentionParams {
  const void* q;              // (B, N, Hq, D), dtype, d contiguous
  const void* k_cache;        // (B, Hkv, S_max, D), dtype, d contiguous
  const void* v_cache;        // (B, Hkv, S_max, D), dtype, d contiguous
  void* out;                  // (B, N, Hq, D), dtype, contiguous
  float* lse;                 // (B, N, Hq) natural-log log-sum-exp of scaled scores, or nullptr
  const int64_t* cache_lens;  // (B,) prefix length per row; 0 <= cache_lens[b] <= S_max - N
  const int32_t* tree_mask;   // (Bm, N, W) with Bm in {1, B}, W = ceil(N / 32): bit (j % 32)
                              // of word j / 32 in row i set <=> node i attends to node j
  int64_t batch;              // B
  int64_t n_tree;             // N >= 1
  int64_t num_q_heads;        // Hq, a multiple of Hkv
  int64_t num_kv_heads;       // Hkv
  int64_t head_dim;           // D
  int64_t max_seq;            // S_max
  int64_t mask_batch_stride;  // N * W when Bm == B, 0 when the mask is shared
  int64_t mask_words;         // W
  int64_t q_stride_b, q_stride_n, q_stride_h;  // elements
  int64_t k_stride_b, k_stride_h, k_stride_s;  // elements
  int64_t v_stride_b, v_stride_h, v_stride_s;  // elements
  float scale;                // softmax scale, usually D^-0.5
  int64_t window;             // 0, or sliding window >= N: node i (at cache_lens[b] + depth_i, depth_i =
                              // popcount of its mask row - 1) sees prefix key k iff that position - k < window
  DType dtype;
  void* workspace;            // tree_attention_workspace_bytes(...) bytes, or nullptr if 0
};

// Head dims the CUDA kernel is instantiated for.
bool tree_attention_supports_head_dim(int64_t head_dim);
// Split count (flash-decoding) chosen for these sizes on a device with num_sms SMs.
int tree_attention_num_splits(const TreeAttentionParams& p, int num_sms);
// Bytes of scratch the launch needs for num_splits splits (0 when num_splits == 1).
size_t tree_attention_workspace_bytes(const TreeAttentionParams& p, int num_splits);
cudaError_t tree_attention(const TreeAttentionParams& p, int num_splits, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------
// Greedy: argmax of every row of logits (first index on ties, NaN wins like
// torch.argmax), then per batch row walk the tree from node 0: among the
// children of the current node (nodes j with parents[j] == cur, in increasing j)
// accept the first whose draft token equals argmax(logits[cur]); stop when none
// does or when max_accept nodes were accepted. bonus = argmax(logits[last]).
struct VerifyGreedyParams {
  const void* logits;          // (B, N, V), dtype, contiguous
  const int64_t* draft_tokens; // (B, N)
  const int64_t* parents;      // (B, N)
  int64_t* argmax_ws;          // (B, N, num_splits) scratch: each split's packed (key, index) maximum
  int64_t* accept_path;        // (B, P) out, P = max_accept + 1
  int64_t* accept_len;         // (B,) out
  int64_t* bonus_token;        // (B,) out
  int64_t batch, n_tree, vocab, path_width;
  DType dtype;
  int64_t num_splits;          // blocks per logits row (verify_greedy_num_splits), >= 1
};
// Splits of each row's argmax so that B * N * splits blocks fill a device of num_sms SMs.
int64_t verify_greedy_num_splits(const VerifyGreedyParams& p, int num_sms);
cudaError_t verify_greedy(const VerifyGreedyParams& p, cudaStream_t stream);

// Sampling for deterministic (top-k) drafts, lossless multi-round rejection on
// the processed target distribution: s = logit / temperature (fp32 division);
// top-k keeps x iff #{y : s_y > s_x} < top_k (top_k <= 0: off); top-p keeps x iff
// the top-k-renormalised mass of {y : s_y > s_x} is < top_p (top_p >= 1: off);
// p = softmax over the kept set. At the current node, its children are tested in
// increasing index order: child j (token t) is accepted iff
// uniforms[b, j] * mass < p(t) (strict; mass starts at 1 and drops by p(t) on each
// rejection, p(t) is then zeroed). When every child is rejected, or the node has
// none, or max_accept is reached, the bonus token is drawn from the residual with
// uniforms[b, 0]: the first token in index order whose running residual sum
// exceeds uniforms[b, 0] * (residual total), among tokens of positive residual
// probability (fallback, reachable through rounding only: the argmax of the processed
// target, first index on ties). p(x) = exp(double(s_x) - max) / Z and every mass,
// Z and top-p comparison are in double on every backend, so the CPU op and the CUDA
// kernel make the same decisions from the same uniforms.
struct VerifySamplingParams {
  const void* logits;          // (B, N, V), dtype, contiguous
  const int64_t* draft_tokens; // (B, N)
  const int64_t* parents;      // (B, N)
  const double* uniforms;      // (B, N) in [0, 1)
  int64_t* accept_path;        // (B, P) out
  int64_t* accept_len;         // (B,) out
  int64_t* bonus_token;        // (B,) out
  int64_t batch, n_tree, vocab, path_width;
  float temperature;           // > 0
  int64_t top_k;               // <= 0 or >= vocab: off
  double top_p;                // (0, 1]; 1: off. Double: a float would round 1 - 2^-26 up to 1 and drop top-p
  DType dtype;
  void* workspace;             // verify_sampling_workspace_bytes(...) bytes (per-node distributions, chunk maxima)
};
size_t verify_sampling_workspace_bytes(const VerifySamplingParams& p);
cudaError_t verify_sampling(const VerifySamplingParams& p, cudaStream_t stream);

// Chain speculative sampling for stochastic drafts: for i < K, draft token x_i
// is accepted iff uniforms[b, i] * q_i(x) < p_i(x); on the first rejection the
// replacement is drawn from norm(max(p_i - q_i, 0)) with uniforms[b, K] (if that
// residual is empty, from p_i); if all K are accepted the bonus is drawn from
// p_K with uniforms[b, K]. tokens[b] = accepted drafts, then the extra token,
// then -1 padding; accept_len[b] = number of accepted draft tokens.
struct ChainSamplingParams {
  const void* draft_probs;     // (B, K, V), dtype, contiguous
  const int64_t* draft_tokens; // (B, K)
  const void* target_probs;    // (B, K + 1, V), dtype, contiguous
  const double* uniforms;      // (B, K + 1) in [0, 1)
  int64_t* tokens;             // (B, K + 1) out
  int64_t* accept_len;         // (B,) out
  int64_t batch, num_spec, vocab;
  DType dtype;
};
cudaError_t chain_speculative_sampling(const ChainSamplingParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------
// KV compaction, all layers in one launch (up to kMaxCompactLayers per launch)
// ---------------------------------------------------------------------------
// For every layer, K and V, row b and 0 < i <= accept_len[b]:
//   cache[b, :, cache_lens[b] + i, :] <- cache[b, :, cache_lens[b] + accept_path[b, i], :]
// accept_path is increasing (parents precede children), so every source is at or
// after its destination and a per-column forward copy is overlap-safe.
constexpr int kMaxCompactLayers = 128;
struct CompactKVParams {
  void* k[kMaxCompactLayers];  // per layer (B, H, S_max, D)
  void* v[kMaxCompactLayers];  // per layer (B, H, S_max, D)
  int num_layers;
  const int64_t* cache_lens;   // (B,)
  const int64_t* accept_path;  // (B, P)
  const int64_t* accept_len;   // (B,)
  int64_t batch, num_heads, max_seq, head_dim, path_width;
  int64_t stride_b, stride_h, stride_s;  // elements, identical for every layer, K and V
  int64_t elem_bytes;          // 2 or 4
};
cudaError_t compact_kv(const CompactKVParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace vispec
