"""Hungarian matching for many small cost matrices: padded batches, one scipy call each.

Completions are sorted by matrix size and cut into chunks of at most `budget` padded cells,
so the vectorised cost computation never pads a 30×30 answer to the batch's largest
(e.g. 300-box) answer. Shape letters: B completions, N predictions, M ground truths.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment


def _quantise(x: np.ndarray) -> np.ndarray:
    """Rounds up to k·2^e with 4 ≤ k < 8 (exact below 8): at most 25% padding per axis."""
    e = np.maximum(0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) - 2)
    return -(-x // (1 << e)) << e


def size_chunks(n: np.ndarray, m: np.ndarray, budget: int = 1 << 20) -> Iterator[np.ndarray]:
    """Index arrays over the rows with n·m > 0: rows of similar (n, m) together, each chunk
    padding to at most `budget` cells and to ≤ 25% more than its rows need per axis."""
    idx = np.flatnonzero((n > 0) & (m > 0))
    if not len(idx):
        return
    qn, qm = _quantise(n[idx]), _quantise(m[idx])
    order = np.lexsort((qm, qn))
    idx, qn, qm = idx[order], qn[order], qm[order]
    starts = np.concatenate([[0], np.flatnonzero((qn[1:] != qn[:-1]) | (qm[1:] != qm[:-1])) + 1, [len(idx)]])
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        per = max(1, budget // int(qn[a] * qm[a]))
        for s in range(a, b, per):
            yield idx[s:min(b, s + per)]


def assign(cost_bnm: np.ndarray, n: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-cost assignment of every `cost[b, :n[b], :m[b]]` (min(n, m) pairs each).

    Returns flat arrays (b, row, col) over all pairs of the batch. Raises ValueError where
    scipy does (NaN or infeasible costs); callers make sure costs are finite.
    """
    rs, cs = [], []
    for b, (nb, mb) in enumerate(zip(n.tolist(), m.tolist())):
        r, c = linear_sum_assignment(cost_bnm[b, :nb, :mb])
        rs.append(r)
        cs.append(c)
    if not rs:
        z = np.zeros(0, np.int64)
        return z, z, z
    return np.repeat(np.arange(len(n)), np.minimum(n, m)), np.concatenate(rs), np.concatenate(cs)


def match_batches(n: np.ndarray, m: np.ndarray, cost_fn: Callable[[np.ndarray], np.ndarray],
                  budget: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matches all rows: `cost_fn(rows) -> [len(rows), N, M]` builds a chunk's padded costs.

    Returns flat (row of the batch, prediction index, ground-truth index) over all pairs.
    """
    out = [[], [], []]
    for rows in size_chunks(n, m, budget):
        b, r, c = assign(cost_fn(rows), n[rows], m[rows])
        out[0].append(rows[b])
        out[1].append(r)
        out[2].append(c)
    if not out[0]:
        z = np.zeros(0, np.int64)
        return z, z, z
    return tuple(np.concatenate(o).astype(np.int64) for o in out)


class Ragged:
    """Rows of variable length stored flat: `values [sum n, ...]`, `n [B]`, `offsets [B]`."""

    def __init__(self, rows: list, width: int, dtype=np.float64):
        self.n = np.array([len(r) for r in rows], np.int64)
        self.offsets = np.cumsum(self.n) - self.n
        flat: list = []
        for r in rows:
            flat.extend(r.tolist() if isinstance(r, np.ndarray) else r)
        self.values = np.asarray(flat, dtype).reshape((-1, width) if width else (-1,))

    @classmethod
    def from_flat(cls, values: np.ndarray, n: np.ndarray) -> "Ragged":
        r = cls.__new__(cls)
        r.values, r.n = values, np.asarray(n, np.int64)
        r.offsets = np.cumsum(r.n) - r.n
        return r

    def padded(self, rows: np.ndarray) -> np.ndarray:
        """`[len(rows), max n, ...]`; padding repeats a row's last value (rows must be non-empty)."""
        n = self.n[rows]
        pos = np.minimum(np.arange(int(n.max()))[None, :], n[:, None] - 1)
        return self.values[self.offsets[rows][:, None] + pos]

    def flat_index(self, b: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Flat position of item i of row b."""
        return self.offsets[b] + i
