import numpy as np
import pytest
import torch

from gppq_dist.pq.codec import decode, encode, pack_indices, snap, unpack_indices


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 9, 11, 12])
def test_pack_round_trip_and_size(bits):
    generator = torch.Generator().manual_seed(bits)
    count = 1001
    indices = torch.randint(2**bits, (count,), generator=generator)
    packed = pack_indices(indices, bits)
    assert packed.dtype == np.uint8 and packed.size == (count * bits + 7) // 8
    assert torch.equal(unpack_indices(packed, bits, count), indices)


def test_pack_rejects_an_index_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_indices(torch.tensor([8]), 3)


def test_unpack_rejects_the_wrong_length():
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_indices(np.zeros(3, dtype=np.uint8), 8, 2)


def test_encode_decode_snap():
    codebook = torch.randn(16, 9)
    assignments = torch.randint(16, (64 * 8,))
    weight = decode(codebook, assignments, (64, 8, 3, 3))
    assert torch.equal(encode(weight + 1e-4, codebook), assignments)
    noisy = weight + 1e-3 * torch.randn_like(weight)
    assert torch.equal(snap(noisy, codebook, assignments), weight)
