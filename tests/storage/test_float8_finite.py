"""The writer's finiteness check on float8 bytes, decided by bit pattern, against torch's own isfinite."""

from __future__ import annotations

import pytest
import torch

from dern_stream.checkpoint.integrity import all_finite, bytes_finite


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_float8_byte_is_judged_as_torch_judges_it(dtype):
    every = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = torch.isfinite(every.to(torch.float32))
    assert not bool(finite.all())  # each format has non-finite patterns
    for i in range(256):
        assert all_finite(every[i:i + 1]) == bool(finite[i]), hex(i)


@pytest.mark.parametrize(("dtype", "name"), [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_one_bad_value_among_millions_past_the_first_chunk(dtype, name):
    values = torch.randn(3_000_000).to(dtype)
    assert all_finite(values) and bytes_finite(memoryview(values.view(torch.uint8).numpy()), name)
    bad = values.view(torch.uint8).clone()
    bad[2_999_999] = 0xFF  # NaN in both formats
    assert not all_finite(bad.view(dtype))
    assert not bytes_finite(memoryview(bad.numpy()), name)
