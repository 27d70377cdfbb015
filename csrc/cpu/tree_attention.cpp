// Tree attention on the CPU: one task per (batch row, kv head). All the query heads
// that share a kv head are stacked into one matrix, so each K/V tile is read once
// and both products run as BLAS GEMMs; an online softmax (as in flash attention)
// keeps memory at one tile whatever the prefix. The tree mask is applied only on
// the tiles that hold tree positions. With a sliding window, node n (at position
// L + depth(n), depth = its mask row's bit count - 1) sees prefix keys from
// L + depth(n) - window + 1 on: tiles wholly below every node's first key are skipped,
// the first ones are masked.
//
// Tasks run one after the other and the GEMMs use ATen's intra-op threads. Running
// the tasks under at::parallel_for instead nests BLAS/oneDNN threading inside an
// OpenMP region, which left spinning threads behind and made every later small
// torch op on the same cores milliseconds slow (seen in the engine on 2 cores).
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "validate.h"

namespace vispec {
namespace cpu {
namespace {

// Keys per tile: about 64k scores per tile, so that few query rows (plain MHA,
// small trees) still get large GEMMs and few op calls.
int64_t tile_keys(int64_t rows) { return std::clamp<int64_t>(65536 / std::max<int64_t>(rows, 1), 256, 4096); }

void tree_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cache_lens, const at::Tensor& tree_mask, float scale, int64_t window,
                           at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), N = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv;  // query heads per kv head
  const int64_t R = N * G;     // query rows sharing one kv head: row r <-> (node r / G, head hk * G + r % G)
  const int64_t W = tree_mask.size(2);
  const int64_t mask_bstride = tree_mask.size(0) == 1 ? 0 : N * W;
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(tree_mask.data_ptr<int32_t>());
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // (B, N, Hq, D) -> (B, Hkv, N*G, D): row r of kv head hk is (n = r / G, h = hk*G + r % G).
  const at::Tensor qv = q.view({B, N, Hkv, G, D}).permute({0, 2, 1, 3, 4}).reshape({B, Hkv, R, D});
  // out viewed the same way, so results go back with one strided copy per batch row.
  at::Tensor ov = out.view({B, N, Hkv, G, D}).permute({0, 2, 1, 3, 4});
  at::Tensor lv = lse.numel() > 0 ? lse.view({B, N, Hkv, G}).permute({0, 2, 1, 3}) : at::Tensor();
  const int64_t tile = tile_keys(Hkv * R);
  // Tree keys a row must not see (masked_fill, not adding -inf: a hidden key's NaN must not reach the row).
  at::Tensor hidden = at::empty({R, N}, q.options().dtype(at::kBool));
  at::Tensor first_key = at::empty({R}, q.options().dtype(at::kLong));  // window: each row's first visible key

  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens[b];
    // Out of place: for fp32 inputs .to() returns a view of q, which must not change.
    const at::Tensor qf = qv[b].to(at::kFloat).mul(scale);  // (Hkv, R, D)
    at::Tensor acc = at::zeros({Hkv, R, D}, qf.options());
    at::Tensor m = at::full({Hkv, R, 1}, neg_inf, qf.options());
    at::Tensor l = at::zeros({Hkv, R, 1}, qf.options());
    const uint32_t* mrow = mask + b * mask_bstride;
    bool* bp = hidden.data_ptr<bool>();
    int64_t* fk = first_key.data_ptr<int64_t>();
    int64_t lo_min = L, lo_max = 0;  // range of the rows' first visible prefix keys
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = r / G;
      int64_t bits = 0;
      for (int64_t j = 0; j < N; ++j) {
        const bool on = (mrow[n * W + j / 32] >> (j % 32)) & 1u;
        bp[r * N + j] = !on;
        bits += on;
      }
      fk[r] = window > 0 ? std::clamp<int64_t>(L + (bits - 1) - window + 1, 0, L) : 0;
      lo_min = std::min(lo_min, fk[r]);
      lo_max = std::max(lo_max, fk[r]);
    }
    const at::Tensor fk_col = first_key.view({1, R, 1});
    for (int64_t t0 = window > 0 ? lo_min : 0; t0 < L + N; t0 += tile) {
      const int64_t nt = std::min(tile, L + N - t0);
      const at::Tensor kf = k_cache[b].narrow(1, t0, nt).to(at::kFloat);  // (Hkv, nt, D)
      const at::Tensor vf = v_cache[b].narrow(1, t0, nt).to(at::kFloat);
      at::Tensor s = at::bmm(qf, kf.transpose(1, 2));  // (Hkv, R, nt) scaled scores, one GEMM per kv head
      if (window > 0 && t0 < lo_max) {  // keys older than a row's window
        const at::Tensor pos = at::arange(t0, t0 + nt, first_key.options()).view({1, 1, nt});
        s.masked_fill_(pos < fk_col, neg_inf);
      }
      if (t0 + nt > L) {  // this tile holds tree positions: apply the mask there only
        const int64_t c0 = std::max<int64_t>(0, L - t0);  // first tree column of the tile
        s.narrow(2, c0, nt - c0).masked_fill_(hidden.narrow(1, t0 + c0 - L, nt - c0), neg_inf);
      }
      const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(2, /*keepdim=*/true)));
      // Rows with nothing visible yet keep max -inf; shift them by 0 so exp gives 0, not NaN.
      const at::Tensor shift = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);
      const at::Tensor corr = (m - shift).exp_();
      s.sub_(shift).exp_();
      l.mul_(corr).add_(s.sum(2, /*keepdim=*/true));
      acc.mul_(corr).baddbmm_(s, vf);
      m = m_new;
    }
    // A row that sees nothing (no diagonal bit, empty prefix) gets 0 and lse -inf, never 0/0.
    const at::Tensor seen = l > 0;
    const at::Tensor o = at::where(seen, acc / l, at::zeros_like(acc));  // (Hkv, R, D)
    ov[b].copy_(o.view({Hkv, N, G, D}));
    if (lv.defined()) {
      lv[b].copy_(at::where(seen, m + l.log(), at::full_like(m, neg_inf)).view({Hkv, N, G}));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                      const at::Tensor& tree_mask, double scale, bool return_lse,
                                                      int64_t window) {
  check_tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, window);
  check_tree_attention_values(q, k_cache, cache_lens);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor lse = return_lse ? at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  tree_attention_kernel(q, k_cache, v_cache, cache_lens, tree_mask, static_cast<float>(scale), window, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace cpu
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CPU, m) { m.impl("tree_attention", &vispec::cpu::tree_attention_cpu); }
