// Device helpers shared by the vispec CUDA kernels: element conversion to fp32,
// 16-byte vector unpacking, warp / block reductions, monotone float keys and a
// block-wide row iterator. Torch-free on purpose (see vispec/launchers.h).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vispec {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Element <-> fp32
// ---------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte vector.
template <typename T>
struct VecTraits {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// Unpacks a 16-byte vector (loaded as uint4) into kElems floats, element k of
// the vector being the element at the lower address first (little endian).
// Bit extraction instead of pointer punning keeps this free of aliasing UB.
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[4], float) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[8], __half) {
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[8], __nv_bfloat16) {
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------
struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a > b ? a : b;
  }
};
struct MinOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a < b ? a : b;
  }
};

// Butterfly reduction: every lane ends with the same result.
template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_allreduce(v, SumOp()); }

// Block-wide all-reduce. Every thread of the block must call it (blockDim.x a
// multiple of 32, at most 1024); all threads get the same value because they all
// combine the per-warp partials in the same order. scratch: >= 32 elements of
// shared memory. The leading barrier makes back-to-back calls on the same
// scratch safe (the previous call's readers are done before it is rewritten).
template <typename V, typename Op>
__device__ __forceinline__ V block_allreduce(V v, Op op, V* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x >> 5);
  v = warp_allreduce(v, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V r = scratch[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, scratch[w]);
  return r;
}

// Block-wide sum of M values at once. scratch: >= 32 * M + M elements of shared
// memory. Thread j < M folds value j over the warps (fixed order, so results
// are deterministic and identical for every thread) and publishes it.
template <typename V, int M>
__device__ __forceinline__ void block_sum_array(V (&v)[M], V* scratch) {
  static_assert(M <= 32, "block_sum_array: M must be <= 32");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x >> 5);
  V* result = scratch + 32 * M;
#pragma unroll
  for (int j = 0; j < M; ++j) v[j] = warp_allreduce(v[j], SumOp());
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < M; ++j) scratch[warp * M + j] = v[j];
  }
  __syncthreads();
  if (threadIdx.x < M) {
    V r = scratch[threadIdx.x];
    for (int w = 1; w < nwarps; ++w) r += scratch[w * M + threadIdx.x];
    result[threadIdx.x] = r;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < M; ++j) v[j] = result[j];
}

// Inclusive block scan (sum) of one double per thread, in thread order.
// scratch: >= 32 doubles. Returns this thread's inclusive prefix.
__device__ __forceinline__ double block_inclusive_scan(double v, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x >> 5);
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < nwarps ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += n;
    }
    if (lane < nwarps) scratch[lane] = w;  // inclusive scan of the warp totals
  }
  __syncthreads();
  if (warp > 0) v += scratch[warp - 1];
  return v;
}

// ---------------------------------------------------------------------------
// Monotone 32-bit keys of floats: a < b (as non-NaN floats) <=> key(a) < key(b),
// once -0.0 is folded into +0.0 so that equal floats get equal keys. NaN must be
// mapped by the caller.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t float_to_key(float f) {
  if (f == 0.0f) f = 0.0f;  // -0.0 == +0.0: give them one key
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_to_float(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  return __uint_as_float(b);
}

// (key, index) packed so that the unsigned max is the largest key and, among
// equal keys, the smallest index (indices < 2^32).
__device__ __forceinline__ unsigned long long pack_key_index(uint32_t key, int64_t index) {
  return (static_cast<unsigned long long>(key) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(index));
}
__device__ __forceinline__ int64_t unpack_index(unsigned long long packed) {
  return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(packed & 0xffffffffull));
}
__device__ __forceinline__ uint32_t unpack_key(unsigned long long packed) {
  return static_cast<uint32_t>(packed >> 32);
}

// ---------------------------------------------------------------------------
// Calls f(index, value_as_float) once for each of the n elements of row, spread
// over the threads of the block; the aligned body is read with 16-byte loads.
// The element -> thread assignment and each thread's visiting order depend only
// on (row address, n, blockDim), so repeated passes over one row accumulate in
// the same order. f must not depend on the visiting order otherwise.
// ---------------------------------------------------------------------------
template <typename T, typename F>
__device__ __forceinline__ void block_row_for_each(const T* row, int64_t n, F&& f) {
  constexpr int kVec = VecTraits<T>::kElems;
  const int64_t tid = threadIdx.x;
  const int64_t nt = blockDim.x;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  // Elements before the first 16-byte boundary (an element-aligned pointer
  // reaches one after at most kVec - 1 elements).
  int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
  if (addr % sizeof(T) != 0) head = n;  // not even element aligned: all scalar
  if (head > n) head = n;
  for (int64_t i = tid; i < head; i += nt) f(i, to_float(row[i]));
  const int64_t nvec = (n - head) / kVec;
  const uint4* vp = reinterpret_cast<const uint4*>(row + head);
#pragma unroll 4  // independent 16-byte loads in flight together
  for (int64_t v = tid; v < nvec; v += nt) {
    const uint4 raw = vp[v];
    float vals[kVec];
    unpack16(raw, vals, T());
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(head + v * kVec + k, vals[k]);
  }
  for (int64_t i = head + nvec * kVec + tid; i < n; i += nt) f(i, to_float(row[i]));
}

// ---------------------------------------------------------------------------
// Tree attention's work decomposition (both kernels: SIMT and tensor cores)
// ---------------------------------------------------------------------------
// Block -> (b, kv head, split, row tile). The row tiles and splits of one (b, kv head) are adjacent block
// ids, so they run close together and share that head's K/V through L2.
struct TreeBlock {
  int64_t b, kvh;
  int split, tile;
};
__device__ __forceinline__ TreeBlock tree_block(int64_t bid, int row_tiles, int num_splits, int64_t num_kv_heads) {
  TreeBlock t;
  t.tile = static_cast<int>(bid % row_tiles);
  bid /= row_tiles;
  t.split = static_cast<int>(bid % num_splits);
  bid /= num_splits;
  t.kvh = bid % num_kv_heads;
  t.b = bid / num_kv_heads;
  return t;
}

// Split `split` of `num_splits` owns the prefix keys [start, end) of a prefix of `cl` keys: equal shares
// rounded up to whole `tile_keys` tiles (a split past the end gets an empty range; only the last split
// also owns the tree keys).
struct KeyRange {
  int64_t start, end;
};
__device__ __forceinline__ KeyRange split_prefix(int64_t cl, int split, int num_splits, int tile_keys) {
  int64_t per = (cl + num_splits - 1) / num_splits;
  per = (per + tile_keys - 1) / tile_keys * tile_keys;
  KeyRange r;
  r.start = static_cast<int64_t>(split) * per;
  r.end = (r.start + per < cl) ? r.start + per : cl;
  return r;
}

}  // namespace detail
}  // namespace cuda
}  // namespace vispec
