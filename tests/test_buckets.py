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
