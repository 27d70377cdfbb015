// KV-cache compaction after verification, every layer's K and V in one launch.
//
// One thread per (layer, K/V, batch row b, head h, column c), where a column is
// a copy unit (16, 8, 4, 2 or 1 bytes, the widest that every pointer, stride and
// row size allows) of the D * elem_bytes bytes of one cache row. For
// i = 1 .. min(accept_len[b], P - 1) the thread copies its column from cache
// position cache_lens[b] + accept_path[b, i] to cache_lens[b] + i, loading a
// batch of sources into registers before storing them.
// accept_path is increasing, so each source (>= i) lies at or after every
// destination written so far (< i): a forward copy never reads a slot it already
// overwrote, and distinct threads own distinct columns, so nothing races.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/vispec/launchers.h"

namespace vispec {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this
constexpr int kBatch = 8;                // sources held in registers at once: a draft depth of up to 8 in one batch

template <typename U>
__global__ void __launch_bounds__(kThreads)
    compact_kv_kernel(const CompactKVParams p, int64_t cols, int64_t total) {
  const int64_t eb = p.elem_bytes;
  const int64_t P = p.path_width;
  const int64_t stride_ctx = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total; item += stride_ctx) {
    // item -> (layer, kv, b, h, c) with the column fastest, so a warp copies
    // contiguous bytes of one cache row.
    int64_t t = item;
    const int64_t c = t % cols;
    t /= cols;
    const int64_t h = t % p.num_heads;
    t /= p.num_heads;
    const int64_t b = t % p.batch;
    t /= p.batch;
    const int kv = static_cast<int>(t % 2);
    const int layer = static_cast<int>(t / 2);  // < num_layers since item < total

    void* cache = kv ? p.v[layer] : p.k[layer];  // (B, H, S_max, D) with strides in elements
    if (cache == nullptr) continue;
    const int64_t cl = p.cache_lens[b];  // cache_lens: (B,)
    if (cl < 0 || cl >= p.max_seq) continue;
    const int64_t room = p.max_seq - cl;  // valid tree offsets are [0, room): no cl + x overflow
    int64_t n = p.accept_len[b];          // accept_len: (B,)
    if (n > P - 1) n = P - 1;
    const int64_t* path = p.accept_path + b * P;  // accept_path: (B, P)
    char* col = static_cast<char*>(cache) + (b * p.stride_b + h * p.stride_h) * eb + c * static_cast<int64_t>(sizeof(U));
    const int64_t row_bytes = p.stride_s * eb;  // bytes between consecutive cache positions
    // Moves 1..m are valid: the walk stops at the first source before its destination (that would break
    // the forward-copy argument and the contract) or past the cache end.
    int64_t m = 0;
    for (int64_t i = 1; i <= n; ++i) {
      const int64_t src = path[i];
      if (src != i && (src < i || src >= room || i >= room)) break;
      m = i;
    }
    // Up to kBatch sources are loaded into registers before any store, so the loads of a column are in
    // flight together instead of one load -> store chain per accepted token. A batch's sources (>= its
    // first destination) lie after every destination of the earlier batches, so none was overwritten.
    for (int64_t i0 = 1; i0 <= m; i0 += kBatch) {
      U vals[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int64_t i = i0 + j;
        if (i <= m && path[i] != i) vals[j] = *reinterpret_cast<const U*>(col + (cl + path[i]) * row_bytes);
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int64_t i = i0 + j;
        if (i <= m && path[i] != i) *reinterpret_cast<U*>(col + (cl + i) * row_bytes) = vals[j];
      }
    }
  }
}

bool unit_fits(const CompactKVParams& p, int64_t unit) {
  const int64_t eb = p.elem_bytes;
  if ((p.head_dim * eb) % unit != 0 || (p.stride_b * eb) % unit != 0 || (p.stride_h * eb) % unit != 0 ||
      (p.stride_s * eb) % unit != 0)
    return false;
  for (int l = 0; l < p.num_layers; ++l) {
    if (reinterpret_cast<uintptr_t>(p.k[l]) % unit != 0 || reinterpret_cast<uintptr_t>(p.v[l]) % unit != 0) return false;
  }
  return true;
}

template <typename U>
cudaError_t launch(const CompactKVParams& p, cudaStream_t stream) {
  const int64_t cols = p.head_dim * p.elem_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t total = static_cast<int64_t>(p.num_layers) * 2 * p.batch * p.num_heads * cols;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  compact_kv_kernel<U><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, cols, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t compact_kv(const CompactKVParams& p, cudaStream_t stream) {
  if (p.num_layers <= 0 || p.batch <= 0 || p.num_heads <= 0 || p.head_dim <= 0 || p.path_width <= 1 ||
      p.max_seq <= 0)
    return cudaSuccess;  // nothing can move
  if (p.num_layers > kMaxCompactLayers || p.elem_bytes <= 0) return cudaErrorInvalidValue;
  int64_t unit = 16;
  while (unit > 1 && !unit_fits(p, unit)) unit /= 2;
  switch (unit) {
    case 16: return launch<uint4>(p, stream);
    case 8: return launch<uint2>(p, stream);
    case 4: return launch<uint32_t>(p, stream);
    case 2: return launch<uint16_t>(p, stream);
    default: return launch<uint8_t>(p, stream);
  }
}

}  // namespace cuda
}  // namespace vispec
