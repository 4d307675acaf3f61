"""A seeded permutation of [0, n) evaluated index by index, in O(1) memory.

A token store can hold billions of blocks; `torch.randperm(n)` would need 8 bytes per
block on every rank. Instead the order is a bijection computed on demand: an
alternating Feistel network on Z_a x Z_b with a = ceil(sqrt(n)), b = ceil(n / a)
(x = left * b + right; each round adds a keyed hash of one half to the other, modulo
its size, and swaps them), restricted to [0, n) by cycle walking: the few images that
land in [n, a*b) are mapped again until they fall inside (a*b - n < a, so nearly all
indices need one pass). The round keys come from (seed, epoch) through blake2b, so every
rank computes the same order without communication, and a resumed run the same as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_ROUNDS = 4  # an even number: the halves end in their starting roles
_U64 = np.uint64
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)  # splitmix64's multipliers


def _hash(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit mixing of each element (wraps mod 2^64)."""
    z = (x + key) * _M1
    z = (z ^ (z >> _U64(31))) * _M2
    return z ^ (z >> _U64(29))


class Permutation:
    """A pseudo-random bijection of [0, n), a pure function of (n, seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1 (got {n})")
        self.n = n
        a = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
        self._a, self._b = _U64(a), _U64(-(-n // a))
        digest = hashlib.blake2b(f"lotus-permutation/{seed}/{epoch}".encode(),
                                 digest_size=8 * _ROUNDS).digest()
        self._keys = [_U64(int.from_bytes(digest[8 * i: 8 * i + 8], "little"))
                      for i in range(_ROUNDS)]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        """The bijection of [0, a*b): (left in Z_a, right in Z_b), alternating."""
        left, right = x // self._b, x % self._b
        sizes = (self._a, self._b)
        for i, key in enumerate(self._keys):
            # (left, right) in Z_p x Z_q -> (right, (left + h(right)) mod p) in Z_q x Z_p
            left, right = right, (left + _hash(right, key) % sizes[i % 2]) % sizes[i % 2]
        return left * self._b + right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """The images of `index` (integers in [0, n)), as int64."""
        x = np.asarray(index, dtype=np.uint64)
        with np.errstate(over="ignore"):
            y = self._rounds(x)
            out = y >= _U64(self.n)
            while out.any():
                y[out] = self._rounds(y[out])
                out = y >= _U64(self.n)
        return y.astype(np.int64)
