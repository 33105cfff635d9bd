"""Seeded Gaussian random projection of per-example gradients, generated block by block.

P ∈ R^{d×p} has i.i.d. N(0, 1/d) entries, so E[PᵀP] = I and projected dot products (Pg)·(Pg') are unbiased
estimates of g·g' (Johnson-Lindenstrauss; proposed for TracIn by Pruthi et al. 2020). The columns of P that
belong to a parameter are drawn from a generator seeded by (seed, parameter name, block), so the same P applies
at every checkpoint and in every call, and the full p×d matrix never has to exist at once: blocks are cached up
to ``cache_bytes`` (512 MiB by default) and regenerated past it.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable

import torch

BLOCK_ELEMENTS = 1 << 22  # entries of P per generated block (16 MB in float32)


def block_seed(seed: int, name: str, block: int) -> int:
    """A stable 63-bit seed for one block of P (independent of Python's hash randomization)."""
    a = zlib.crc32(f"{seed}/{name}/{block}".encode())
    b = zlib.crc32(f"{block}/{name}/{seed}#".encode())
    return (a << 31) ^ b


def gaussian_block(seed: int, name: str, block: int, rows: int, dim: int) -> torch.Tensor:
    """Rows of √dim·Pᵀ for one parameter block: (rows, dim) float32 N(0, 1) entries, always drawn on the CPU."""
    gen = torch.Generator().manual_seed(block_seed(seed, name, block))
    return torch.randn(rows, dim, generator=gen)


class GaussianProjection:
    """``project(name, g)`` maps per-example gradients g (n, numel) of parameter ``name`` to (n, dim) = g Pᵀ_name.

    Summing ``project`` over parameters gives P·vec(full gradient) for the concatenated gradient.
    """

    def __init__(self, dim: int, seed: int = 0, cache_bytes: int = 1 << 29):
        self.dim, self.seed, self.cache_bytes = int(dim), int(seed), int(cache_bytes)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0

    def rows_per_block(self) -> int:
        return max(1, BLOCK_ELEMENTS // self.dim)

    def _block(self, name: str, block: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, block, rows, like.dtype, like.device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        p = gaussian_block(self.seed, name, block, rows, self.dim).to(device=like.device, dtype=like.dtype)
        size = p.numel() * p.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = p
            self._cached_bytes += size
        return p

    def project(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """(n, numel) per-example gradients of parameter ``name`` -> (n, dim)."""
        return self.project_columns(name, g.shape[1], lambda a, b: g[:, a:b])

    def project_columns(self, name: str, numel: int, columns: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Like :meth:`project`, with the gradient given by ``columns(a, b)`` -> its columns a..b-1, (n, b - a):
        each block of P is generated once and only one block's worth of gradient columns exists at a time."""
        out = None
        step = self.rows_per_block()
        for block, start in enumerate(range(0, numel, step)):
            part = columns(start, min(start + step, numel))
            p = self._block(name, block, part.shape[1], part)
            out = part @ p if out is None else out.addmm_(part, p)
        return out.mul_(1 / math.sqrt(self.dim))  # the N(0, 1/dim) scale, applied once

    def matrix(self, sizes: dict[str, int]) -> torch.Tensor:
        """The explicit (dim, Σ sizes) matrix P for parameters in this order (for tests and small models)."""
        cols = []
        step = self.rows_per_block()
        for name, numel in sizes.items():
            for block, start in enumerate(range(0, numel, step)):
                rows = min(step, numel - start)
                cols.append(gaussian_block(self.seed, name, block, rows, self.dim))
        return torch.cat(cols).T / math.sqrt(self.dim)
