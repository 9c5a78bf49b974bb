"""runtime.models.noise.randn_tensor draws the same numbers as diffusers' randn_tensor for the same seeds."""
from __future__ import annotations

import pytest
import torch

torch_utils = pytest.importorskip("diffusers.utils.torch_utils")

from runtime.models.errors import InputError  # noqa: E402
from runtime.models.noise import randn_tensor  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_generator_matches_diffusers(dtype):
    ours = randn_tensor((2, 4, 5, 3), torch.Generator().manual_seed(11), dtype=dtype)
    ref = torch_utils.randn_tensor((2, 4, 5, 3), generator=torch.Generator().manual_seed(11), dtype=dtype)
    assert ours.dtype == dtype and torch.equal(ours, ref)


def test_generator_list_draws_one_row_each_like_diffusers():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    ours = randn_tensor((3, 2, 4, 4), gens())
    assert torch.equal(ours, torch_utils.randn_tensor((3, 2, 4, 4), generator=gens()))
    assert torch.equal(ours[1:2], torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(2)))
    one = randn_tensor((1, 2, 4, 4), [torch.Generator().manual_seed(9)])  # a list of one is one generator
    assert torch.equal(one, torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(9)))


def test_bad_generator_count_is_an_input_error():
    with pytest.raises(InputError, match="2 generators for a batch of 3"):
        randn_tensor((3, 4), [torch.Generator(), torch.Generator()])
