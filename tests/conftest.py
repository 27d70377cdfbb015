import pytest
import torch

import vispec.ops as ops

HAS_CUDA = torch.cuda.is_available() and ops.cuda_built()
CUDA_SKIP_REASON = (
    "no CUDA device" if not torch.cuda.is_available() else "vispec was built without CUDA kernels"
)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)

# Every op test runs on each device; the CUDA copy is skipped (not passed) without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def poison_allocator(nbytes: int, device) -> None:
    """Fills a freed block with NaN so an op that forgets to write an output element is caught.

    The CUDA caching allocator (and usually malloc) hands the same block to the op's outputs.
    """
    n = max(1, nbytes // 4)
    t = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    del t


def random_tree(n: int, gen: torch.Generator, max_children: int | None = None) -> torch.Tensor:
    """parents (N,) of a random tree in topological order: parents[i] < i, parents[0] = -1."""
    parents = torch.full((n,), -1, dtype=torch.int64)
    for i in range(1, n):
        parents[i] = int(torch.randint(0, i, (1,), generator=gen))
    return parents
