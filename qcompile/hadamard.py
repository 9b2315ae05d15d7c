"""Orthogonal matrices for rotating linear inputs: Hadamard matrices and a seeded
random orthogonal fallback (QuaRot-style rotations; DuQuant's uniform first rows).

Invariant: every matrix returned is orthogonal (``H @ H.T == I`` up to float64
rounding), so folding it into a weight and applying it to the input is exact.
``hadamard(n)`` exists for ``n = 2^k`` (Sylvester) and for products of a power of two
with a Paley order (12, 20, 36, ...), e.g. 576 = 36 x 16 and 1536 = 12 x 128.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch

DTYPE = torch.float64


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(m: int) -> str | None:
    """Which Paley construction gives a Hadamard matrix of order ``m`` (primes q only)."""
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"  # order q + 1, q = 3 (mod 4)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"  # order 2 (q + 1), q = 1 (mod 4)
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with ``chi`` the quadratic character mod prime ``q``."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=DTYPE)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int, kind: str) -> torch.Tensor:
    """Unnormalised (+-1) Paley Hadamard matrix of order ``m``."""
    if kind == "paley1":
        q = m - 1
        s = torch.zeros(m, m, dtype=DTYPE)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)  # skew-symmetric: S is a skew conference matrix
        return torch.eye(m, dtype=DTYPE) + s
    q = m // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=DTYPE)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)  # symmetric: C is a symmetric conference matrix
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=DTYPE)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=DTYPE)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=DTYPE), b)


@cache
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product gives a Hadamard matrix of order ``n``, or None.

    Each factor is either a power of two (Sylvester) or a Paley order (prime ``q``:
    ``q + 1`` for ``q = 3 mod 4``, ``2 (q + 1)`` for ``q = 1 mod 4``). A single Paley
    factor times a power of two is preferred (smallest such factor first):
    ``576 -> (36, 16)``, ``1536 -> (12, 128)``, ``24 -> (12, 2)``.
    """
    if n < 1:
        return None
    if _is_pow2(n):
        return (n,)
    if n % 4:
        return None
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    all_divisors = sorted(set(small) | {n // d for d in small})
    divisors = [m for m in all_divisors if m >= 4 and not _is_pow2(m) and _paley_kind(m)]
    for m in divisors:
        if _is_pow2(n // m):
            return (m,) if n == m else (m, n // m)
    for m in divisors:  # products of several Paley orders, e.g. 144 = 12 x 12
        rest = hadamard_factors(n // m)
        if rest is not None:
            return (m, *rest)
    return None


def is_hadamard_order(n: int) -> bool:
    """Whether ``hadamard(n)`` can build a matrix of order ``n``."""
    return hadamard_factors(n) is not None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=DTYPE)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=32)
def _hadamard_pm1(n: int) -> torch.Tensor:
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction for order {n}")
    h = torch.ones(1, 1, dtype=DTYPE)
    for m in factors:
        kind = _paley_kind(m) if not _is_pow2(m) else None
        base = _sylvester(m) if kind is None else _paley(m, kind)
        h = torch.kron(h, base)
    # Flip column signs so that the first row is all +1 (H D stays Hadamard).
    h = h * h[0].sign()[None, :]
    # Verify exactly: entries are +-1 and H H^T = n I (integers, exact in float64).
    if not bool((h.abs() == 1).all()) or not torch.equal(h @ h.T, n * torch.eye(n, dtype=DTYPE)):
        raise AssertionError(f"Hadamard construction for order {n} failed verification")
    return h


def hadamard(n: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``H [n, n]`` (``H @ H.T == I``), first row ``1/sqrt(n)``.

    Built as a Kronecker product of a Sylvester matrix (``n = 2^k``) and Paley
    matrices (``12 = 11 + 1``, ``20 = 19 + 1``, ``36 = 2 (17 + 1)``, ...); see
    ``hadamard_factors``. Every construction is verified (``H H^T = n I`` on the
    +-1 matrix) before it is returned. Raises ``ValueError`` for an order it
    cannot build (use ``hadamard_or_random`` for a fallback).
    """
    return (_hadamard_pm1(int(n)) / math.sqrt(n)).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Seeded random orthogonal ``[n, n]``: QR of a Gaussian, signs fixed by ``diag(R) > 0``
    (Haar distributed, deterministic for a seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    return _random_orthogonal(n, gen).to(dtype)


def _random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(n, n, dtype=DTYPE, generator=gen)
    q, r = torch.linalg.qr(g)
    d = torch.diagonal(r).sign()
    d[d == 0] = 1.0
    return q * d[None, :]


def hadamard_or_random(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``(matrix, kind)``: ``hadamard(n)`` with kind ``"hadamard"`` when an order-n
    construction exists, else ``random_orthogonal(n, seed)`` with kind
    ``"random-orthogonal"``. Both float64 and orthogonal."""
    if is_hadamard_order(n):
        return hadamard(n), "hadamard"
    return random_orthogonal(n, seed), "random-orthogonal"
