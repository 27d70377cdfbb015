// Tree attention on the CPU: one task per (batch row, kv head, block of query
// rows). Each task streams the visible K/V positions once in tiles, converting
// them to fp32, and keeps an online softmax per query row (like flash attention),
// so memory stays O(tile) whatever the prefix length.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "validate.h"

namespace vispec {
namespace cpu {
namespace {

constexpr int64_t kTile = 128;      // keys per tile
constexpr int64_t kRowBlock = 32;   // query rows (node, head) per task

template <typename T>
void tree_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cache_lens, const at::Tensor& tree_mask, float scale, at::Tensor& out,
                           float* lse) {
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv;         // query heads per kv head
  const int64_t R = N * G;            // query rows sharing one kv head
  const int64_t row_blocks = (R + kRowBlock - 1) / kRowBlock;
  const int64_t W = tree_mask.size(2);
  const int64_t mask_bstride = tree_mask.size(0) == 1 ? 0 : N * W;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(tree_mask.data_ptr<int32_t>());
  const int64_t ksb = k_cache.stride(0), ksh = k_cache.stride(1), kss = k_cache.stride(2);
  const int64_t vsb = v_cache.stride(0), vsh = v_cache.stride(1), vss = v_cache.stride(2);

  at::parallel_for(0, B * Hkv * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(kRowBlock * D), acc(kRowBlock * D), kf(kTile * D), vf(kTile * D);
    std::vector<float> scores(kRowBlock * kTile), row_max(kRowBlock), row_sum(kRowBlock);
    std::vector<int64_t> tile_pos(kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % row_blocks;
      const int64_t hk = (task / row_blocks) % Hkv;
      const int64_t b = task / (row_blocks * Hkv);
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, R - r0);
      const int64_t L = lens[b];
      // Row r <-> (node n = r / G, q head hk * G + r % G).
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t n = (r0 + r) / G, h = hk * G + (r0 + r) % G;
        const T* src = qp + ((b * N + n) * Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      const T* kb = kp + b * ksb + hk * ksh;
      const T* vb = vp + b * vsb + hk * vsh;
      const uint32_t* mrow = mask + b * mask_bstride;

      // Keys: prefix positions 0..L-1 (all visible), then the N tree positions.
      for (int64_t t0 = 0; t0 < L + N; t0 += kTile) {
        const int64_t nt = std::min(kTile, L + N - t0);
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t pos = t0 + t;
          const T* ks = kb + pos * kss;
          const T* vs = vb + pos * vss;
          for (int64_t d = 0; d < D; ++d) {
            kf[t * D + d] = static_cast<float>(ks[d]);
            vf[t * D + d] = static_cast<float>(vs[d]);
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t n = (r0 + r) / G;
          const float* qr = &qf[r * D];
          float tile_max = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < nt; ++t) {
            const int64_t pos = t0 + t;
            bool visible = pos < L;
            if (!visible) {
              const int64_t j = pos - L;  // tree node j: visible per mask bit
              visible = (mrow[n * W + j / 32] >> (j % 32)) & 1u;
            }
            float s = -std::numeric_limits<float>::infinity();
            if (visible) {
              const float* kr = &kf[t * D];
              float dot = 0.f;
              for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
              s = dot;
            }
            scores[r * kTile + t] = s;
            tile_max = std::max(tile_max, s);
          }
          if (tile_max == -std::numeric_limits<float>::infinity()) continue;  // nothing visible in this tile
          const float new_max = std::max(row_max[r], tile_max);
          const float correction = std::exp(row_max[r] - new_max);  // exp(-inf) = 0 on the first tile
          float* ar = &acc[r * D];
          for (int64_t d = 0; d < D; ++d) ar[d] *= correction;
          float sum = row_sum[r] * correction;
          for (int64_t t = 0; t < nt; ++t) {
            const float s = scores[r * kTile + t];
            if (s == -std::numeric_limits<float>::infinity()) continue;
            const float p = std::exp(s - new_max);
            sum += p;
            const float* vr = &vf[t * D];
            for (int64_t d = 0; d < D; ++d) ar[d] += p * vr[d];
          }
          row_max[r] = new_max;
          row_sum[r] = sum;
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t n = (r0 + r) / G, h = hk * G + (r0 + r) % G;
        T* dst = op + ((b * N + n) * Hq + h) * D;
        // A row that sees nothing (no diagonal bit, empty prefix) gets 0 and lse -inf, never 0/0.
        const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[r * D + d] * inv);
        if (lse != nullptr) {
          lse[(b * N + n) * Hq + h] = row_sum[r] > 0.f ? row_max[r] + std::log(row_sum[r])
                                                       : -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                      const at::Tensor& tree_mask, double scale, bool return_lse) {
  check_tree_attention(q, k_cache, v_cache, cache_lens, tree_mask);
  check_tree_attention_values(q, k_cache, cache_lens);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = return_lse ? at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  dispatch_float(q.scalar_type(), "tree_attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    tree_attention_kernel<T>(q, k_cache, v_cache, cache_lens, tree_mask, static_cast<float>(scale), out,
                             return_lse ? lse.data_ptr<float>() : nullptr);
  });
  return {out, lse};
}

}  // namespace
}  // namespace cpu
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CPU, m) { m.impl("tree_attention", &vispec::cpu::tree_attention_cpu); }
