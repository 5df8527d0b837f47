"""CountSketch of gradient-shaped vectors, for offline drift and similarity matrices (docs/gradient_alignment.md).

S(v)_j = sum_{i: h(i)=j} s(i) v_i with a hash h: [n] -> [k] and signs s in {-1, +1} generated per parameter
tensor from (seed, tensor index), so no dense k x n matrix ever exists. S is linear and E<S(a), S(b)> = <a, b>
with error about ||a|| ||b|| / sqrt(k) (cosine noise ~0.008 at k = 16384): use exact G online and sketches
only for drift across steps and similarity matrices. Sketches of the same run (same seed, same parameter
shapes) are comparable across steps, and, being linear, sketches of per-rank vectors can be all-reduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_CACHE_LIMIT = 50_000_000
"""Cache hashes and signs when the vectors have at most this many entries (12 bytes/entry); else regenerate."""


class CountSketch:
    """A seeded CountSketch R^n -> R^k over a list of tensors with fixed shapes."""

    def __init__(self, shapes: Sequence[torch.Size], dim: int = 16384, seed: int = 0):
        if dim <= 0:
            raise ValueError("sketch dim must be positive")
        self.shapes, self.dim, self.seed = [torch.Size(s) for s in shapes], int(dim), int(seed)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if sum(s.numel() for s in self.shapes) <= _CACHE_LIMIT:
            self._cache = [self._hash(i) for i in range(len(self.shapes))]

    def _hash(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n = self.shapes[i].numel()
        idx = torch.randint(0, self.dim, (n,), generator=gen, dtype=torch.int64)
        sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        return idx, sign

    def __call__(self, vec: Sequence[torch.Tensor]) -> torch.Tensor:
        """(k,) float32 sketch of `vec` (one tensor per shape)."""
        out = torch.zeros(self.dim, dtype=torch.float32)
        for i, t in enumerate(vec):
            idx, sign = self._cache[i] if self._cache is not None else self._hash(i)
            out.index_add_(0, idx, t.detach().reshape(-1).float().cpu() * sign)
        return out


def sketch_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two sketches (estimate of the cosine between the sketched vectors)."""
    den = (a.double().norm() * b.double().norm()).item()
    return float((a.double() @ b.double()).item() / den) if den > 0 else float("nan")
