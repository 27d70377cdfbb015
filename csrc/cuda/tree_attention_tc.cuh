// Tensor-core path of tree attention (bf16 / fp16, sm_80+), called by tree_attention.cu.
// Internal to the CUDA kernels; the public contract is vispec/launchers.h.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../include/vispec/launchers.h"

namespace vispec {
namespace cuda {
namespace tc {

// Query rows of one block (the N * G rows of a (batch row, kv head) are cut into such tiles).
constexpr int kRows = 64;
// Keys per K/V tile; the prefix splits are multiples of it.
constexpr int kKeys = 64;

// True when this launch runs on tensor cores: bf16 / fp16, head dim 64 / 80 / 96 / 128, K and V rows
// 16-byte aligned (cp.async), a device of compute capability >= 8.0, and VISPEC_TREE_ATTENTION_KERNEL
// not set to "simt" (the SIMT kernel stays as the fp32 / head-dim-256 path and for A/B measurements).
bool eligible(const TreeAttentionParams& p);

// ceil(N * G / kRows): blocks per (batch row, kv head, split).
int64_t row_tiles(const TreeAttentionParams& p);

// Launches the main kernel. num_splits == 1: writes p.out / p.lse; else the normalised per-split partials
// ws_out (splits, B * N * Hq, D) and their log2-sum-exp ws_lse (splits, B * N * Hq) that the combine
// kernel of tree_attention.cu merges (NaN lse: the split saw a NaN score).
cudaError_t launch(const TreeAttentionParams& p, int num_splits, float* ws_out, float* ws_lse, cudaStream_t stream);

}  // namespace tc
}  // namespace cuda
}  // namespace vispec
