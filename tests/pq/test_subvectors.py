import pytest
import torch

from gppq_dist.pq.subvectors import from_subvectors, to_subvectors


@pytest.mark.parametrize(
    "shape, d",
    [((64, 64, 3, 3), 9), ((64, 64, 3, 3), 18), ((256, 64, 1, 1), 4), ((10, 512), 4), ((128, 4, 3, 3), 36)],
)
def test_round_trip_is_exact(shape, d):
    weight = torch.randn(shape)
    subvectors = to_subvectors(weight, d)
    assert subvectors.shape == (weight.numel() // d, d)
    assert torch.equal(from_subvectors(subvectors, shape), weight)


def test_layout_follows_filters_then_input_channels():
    weight = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    # d=9: one kernel slice W[o, i]; d=18: two adjacent input channels
    assert torch.equal(to_subvectors(weight, 9)[5], weight[1, 1].reshape(-1))
    assert torch.equal(to_subvectors(weight, 18)[3], weight[1, 2:4].reshape(-1))
    pointwise = torch.randn(8, 16, 1, 1)
    assert torch.equal(to_subvectors(pointwise, 4)[6], pointwise[1, 8:12, 0, 0])


def test_d_must_divide_the_row():
    with pytest.raises(ValueError, match="does not divide the row length 576"):
        to_subvectors(torch.randn(8, 64, 3, 3), 7)
