"""BlockMask views: CSR, dense, picture, summary, immutability."""
import dataclasses

import pytest
import torch

from lvsa.mask import BlockMask, dense_mask, token_ranges
from lvsa.schedule import plan_schedule


def test_views_agree():
    m = plan_schedule(41, 3, 1, 21, tokens_per_frame=5).mask(2)
    d = m.to_dense()
    assert d.shape == (41, 41) and d.dtype == torch.bool
    indptr, indices = m.indptr, m.indices
    assert len(indptr) == 42 and indptr[-1] == len(indices) == m.nnz() == int(d.sum())
    for f in range(41):
        row = indices[indptr[f]:indptr[f + 1]]
        assert list(row) == sorted(row) == torch.nonzero(d[f]).flatten().tolist() == list(m.attended(f))
    tok = m.to_dense("token")
    assert tok.shape == (205, 205)
    assert torch.equal(tok[::5, ::5], d)
    assert abs(m.sparsity() - (1 - d.double().mean().item())) < 1e-12
    ip, ix = m.csr_tensors()
    assert ip.dtype == torch.int32 and ip.tolist() == list(indptr) and ix.tolist() == list(indices)
    # immutable data: nothing mutable (no cache) lives inside a mask
    assert not any(isinstance(x, (dict, list, set)) for x in vars(m).values())


def test_picture_symbols():
    m = BlockMask(6, (0, 3), ((0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 5)))
    rows = m.to_string().splitlines()
    assert rows[0].split() == ["0", "XW.G..", "3"]
    assert rows[2].split() == ["2", "GWWX..", "4"]
    assert rows[5].split() == ["5", "G..GWW", "4"]
    assert rows[5].endswith(str(len(m.attended(5))))


def test_summary_and_repr():
    s = plan_schedule(81, 3, 1, 21).mask(0)
    summ = s.summary()
    assert summ.global_count == 14 and summ.attended_min == summ.attended_max == 21
    assert abs(summ.extension_ratio - 81 / 21) < 1e-12
    r = repr(s)
    assert "T=81" in r and "sparsity=0.741" in r


def test_immutable_and_validated():
    m = dense_mask(4)
    assert m.is_dense and m.sparsity() == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.num_frames = 5
    with pytest.raises(ValueError, match="sorted"):
        BlockMask(4, (2, 1), None)
    with pytest.raises(ValueError, match="outside"):
        BlockMask(3, (0,), ((0, 1), (0, 3), (1, 2)))
    with pytest.raises(ValueError, match="one window per frame"):
        BlockMask(3, (0,), ((0, 1),))
    with pytest.raises(ValueError, match="attend to no frame"):
        BlockMask(4, (), None)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        BlockMask(3, (0,), None).to_dense("token")
    with pytest.raises(ValueError, match="too large"):
        dense_mask(100).to_dense("token", tokens_per_frame=1000)


def test_token_ranges():
    assert token_ranges([0, 1, 2, 5, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert token_ranges([]) == []


def test_windows_given_as_lists_are_plain_tuples():
    """A mask built by hand with list windows equals (and hashes like) the planned form."""
    a = BlockMask(3, [0], [[0, 1], [0, 2], [1, 2]])
    b = BlockMask(3, (0,), ((0, 1), (0, 2), (1, 2)))
    assert a == b and hash(a) == hash(b) and a.windows == ((0, 1), (0, 2), (1, 2))
