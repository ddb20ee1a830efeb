"""The one bucketing rule (ftjax.buckets) and its three users: batch lengths, streaming kernel lengths, padded
reduction widths."""

from ftjax.engine import streaming
from ftjax.buckets import pow2_bucket
from ftjax.data import bucket_length
from ftjax.merge.passes import row_sums


def test_pow2_bucket():
    assert [pow2_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert pow2_bucket(3, minimum=16) == 16 and pow2_bucket(17, 16) == 32 and pow2_bucket(900, 16, cap=600) == 600


def test_users_share_the_rule():
    assert bucket_length(17, 1000) == pow2_bucket(17, 16, 1000)
    assert streaming._bucket(5000, 1 << 20, False) == pow2_bucket(5000, streaming.MIN_BUCKET, 1 << 20) == 8192
    assert streaming._bucket(5000, 1 << 20, True) == 1 << 20  # the compiled full buffer: no new shape
    import numpy as np

    x = np.arange(12, dtype=np.float32)
    assert np.asarray(row_sums(x, 3)).tolist() == [3.0, 12.0, 21.0, 30.0]  # rows of 3, padded to 4


def _row_sums_reference(x, width: int, lanes: int = 256):
    """row_sums' documented order in numpy float32: blocks of `lanes` added pairwise as vectors (an odd one out
    carried), then the lanes pairwise."""
    import numpy as np

    lanes = min(lanes, pow2_bucket(width))
    rows = x.reshape(-1, width)
    padded = -(-width // lanes) * lanes
    r = np.zeros((rows.shape[0], padded), np.float32)
    r[:, :width] = rows
    blocks = [r[:, k * lanes:(k + 1) * lanes] for k in range(padded // lanes)]
    while len(blocks) > 1:
        h = len(blocks) // 2
        blocks = [blocks[i] + blocks[h + i] for i in range(h)] + blocks[2 * h:]
    v = blocks[0]
    while v.shape[1] > 1:
        h = v.shape[1] // 2
        v = v[:, :h] + v[:, h:]
    return v[:, 0]


def test_row_sums_order_is_fixed_by_width_and_accurate():
    """row_sums adds in an order fixed by the row width only (22 blocks of 256 for 5632: odd levels carry a block):
    the same bits for rows taken one by one or together, equal to a numpy float32 emulation of the order, and within
    log2(width) roundings of the float64 sums."""
    import numpy as np

    rng = np.random.default_rng(0)
    for width in (5632, 2048, 300, 7):
        x = rng.standard_normal(6 * width).astype(np.float32)
        got = np.asarray(row_sums(x, width))
        np.testing.assert_array_equal(got, _row_sums_reference(x, width), err_msg=str(width))
        alone = np.concatenate([np.asarray(row_sums(x[i * width:(i + 1) * width], width)) for i in range(6)])
        np.testing.assert_array_equal(got, alone)
        exact = x.reshape(-1, width).astype(np.float64).sum(1)
        bound = np.log2(pow2_bucket(width)) * 2.0**-24 * np.abs(x.reshape(-1, width)).astype(np.float64).sum(1)
        assert (np.abs(got - exact) <= bound).all(), width
