// KV-cache compaction on the CPU: after verification, the accepted tree nodes'
// K/V entries are moved so that they become contiguous after the prefix, for
// every layer in one call.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "validate.h"

namespace vispec {
namespace cpu {
namespace {

void compact_kv_cpu(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& cache_lens,
                    const at::Tensor& accept_path, const at::Tensor& accept_len) {
  check_compact(k_caches, v_caches, cache_lens, accept_path, accept_len);
  if (k_caches.empty()) return;
  const at::Tensor& ref = k_caches[0];
  check_compact_values(cache_lens, accept_path, accept_len, ref.size(2));
  const int64_t L = static_cast<int64_t>(k_caches.size());
  const int64_t B = ref.size(0), H = ref.size(1), D = ref.size(3), P = accept_path.size(1);
  const int64_t esize = static_cast<int64_t>(ref.element_size());
  const int64_t sb = ref.stride(0) * esize, sh = ref.stride(1) * esize, ss = ref.stride(2) * esize;
  const int64_t row_bytes = D * esize;
  const int64_t* lens = cache_lens.data_ptr<int64_t>();
  const int64_t* path = accept_path.data_ptr<int64_t>();
  const int64_t* alen = accept_len.data_ptr<int64_t>();
  std::vector<char*> bases(2 * L);
  for (int64_t l = 0; l < L; ++l) {
    bases[2 * l] = static_cast<char*>(k_caches[l].data_ptr());
    bases[2 * l + 1] = static_cast<char*>(v_caches[l].data_ptr());
  }
  at::parallel_for(0, 2 * L * B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, b = (task / H) % B, lk = task / (H * B);
      char* head = bases[lk] + b * sb + h * sh + lens[b] * ss;
      // path is strictly increasing with path[0] = 0, so path[j] >= j: a source read at
      // step j lies above every destination i < j written before it. Copying in
      // increasing i is therefore overlap-safe without a temporary.
      for (int64_t i = 1; i <= alen[b]; ++i) {
        const int64_t src = path[b * P + i];
        if (src != i) std::memmove(head + i * ss, head + src * ss, row_bytes);
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace vispec

TORCH_LIBRARY_IMPL(vispec, CPU, m) { m.impl("compact_kv_", &vispec::cpu::compact_kv_cpu); }
