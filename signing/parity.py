"""Erasure coding of a split bundle's stripes with zfec (pure core; layout in
:class:`signing.partindex.Parity` and docs/bundle-format.md, section 10).

zfec (Reed-Solomon over GF(2^8), from Tahoe-LAFS) turns k equal blocks into m; any k of the
m give the k back. The builder encodes each stripe of the k data parts into ``parity`` more
blocks; the host decodes a stripe from any k good blocks to rebuild a bad data part. Both
sides call this module, so the stripe layout has one definition.
"""

from __future__ import annotations

from collections.abc import Sequence

from signing.partindex import MAX_PARTS


def stripe_count(first_part_size: int, stripe_bytes: int) -> int:
    return -(-first_part_size // stripe_bytes)


def stripe_span(t: int, first_part_size: int, stripe_bytes: int) -> tuple[int, int]:
    """Offset and length of stripe ``t`` in every part (the last stripe may be short)."""
    start = t * stripe_bytes
    return start, min(stripe_bytes, first_part_size - start)


class StripeCoder:
    """Encoder and decoder for ``k`` data blocks and ``parity`` parity blocks a stripe."""

    def __init__(self, k: int, parity: int) -> None:
        if not (k >= 1 and parity >= 1 and k + parity <= MAX_PARTS):
            raise ValueError(f"zfec codes 1 to {MAX_PARTS} blocks: k={k}, parity={parity}")
        import zfec  # noqa: PLC0415 - a C extension only split bundles with parity need

        self.k = k
        self.m = k + parity
        self._encoder = zfec.Encoder(k, self.m)
        self._decoder = zfec.Decoder(k, self.m)
        self._parity_numbers = tuple(range(k, self.m))

    def encode(self, data_blocks: Sequence[bytes]) -> list[bytes]:
        """The parity blocks of one stripe (``data_blocks``: k blocks of equal length)."""
        return [bytes(b) for b in self._encoder.encode(tuple(data_blocks), self._parity_numbers)]

    def decode(self, blocks: Sequence[bytes], numbers: Sequence[int]) -> list[bytes]:
        """The k data blocks of one stripe from any k good blocks; ``numbers``: each block's
        number, 0 to k - 1 for data parts, k and up for parity parts."""
        if len(blocks) != self.k or len(set(numbers)) != self.k:
            raise ValueError(f"decoding needs {self.k} distinct blocks")
        return [bytes(b) for b in self._decoder.decode(tuple(blocks), tuple(numbers))]
