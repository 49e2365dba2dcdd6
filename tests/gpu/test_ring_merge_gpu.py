"""The ring's merge kernel on a GPU: it gives what diffusers' ring formula gives, in the layout the next layer
reads, for FLUX's attention shapes and an odd one."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("shape", [(1, 24, 2304, 128), (2, 24, 2304, 128), (1, 3, 17, 64)])
def test_merge_kernel_equals_the_ring_formula(shape: tuple[int, int, int, int]) -> None:
    from diffuserve.engine.parallel.merge import merge, merge_pair, mergeable, ring_formula

    assert mergeable(shape[-1])
    generator = torch.Generator("cuda").manual_seed(0)
    out0, out1 = (torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16) for _ in range(2))
    lse0, lse1 = (torch.randn(shape[:3], device="cuda", generator=generator) * 3 for _ in range(2))

    merged = merge_pair(out0, lse0, out1, lse1)
    expected = ring_formula([out0, lse0, out1, lse1])
    assert torch.equal(merge([out0, lse0, out1, lse1]), merged), "a pair on CUDA merges by the kernel"

    assert merged.shape == expected.shape == (shape[0], shape[2], shape[1], shape[3])
    assert merged.is_contiguous() and merged.dtype == torch.bfloat16
    # The same float32 formula, its operations in another order: at most one bf16 step apart.
    torch.testing.assert_close(merged.float(), expected.float(), rtol=2**-7, atol=2**-7)
    # A part whose log-sum-exp dominates gives that part.
    only_first = merge_pair(out0, lse0 + 100, out1, lse1)
    torch.testing.assert_close(only_first, out0.transpose(1, 2).contiguous(), rtol=0, atol=0)
