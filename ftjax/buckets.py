"""The one shape-bucketing rule: sizes rounded up to a power of two, so a jitted function sees few distinct shapes
and compiles few times (sequence lengths of batches, prompt and cache lengths, streaming kernel lengths, padded
reduction widths)."""

from __future__ import annotations


def pow2_bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= n and >= `minimum` (itself a power of two), capped at `cap`."""
    size = max(minimum, 1 << max(int(n) - 1, 0).bit_length())
    return size if cap is None else min(size, cap)
