"""Query streams for online adaptation: which query arrives when, under which shift.

* ``mixed_stream``: every query gets one (corruption, severity) drawn at random; the
  stream is shuffled, so shifts arrive interleaved.
* ``source_share_stream``: the share of clean ("source-like") queries falls linearly
  from ``start`` (default 50 %) at the head of the stream to ``end`` (0 %) at its tail
  — the regime REST leaves open (batches with no source-like query).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qshift.errors import InputError

CLEAN = "clean"


@dataclass(frozen=True)
class StreamItem:
    query: int       # index into the clean query list
    shift: str       # corruption name or "clean"
    severity: int    # 0 for clean


def _check(n: int, shifts: list[str], severities: list[int]) -> None:
    if n < 1:
        raise InputError(f"a stream needs at least one query, got {n}")
    if not shifts:
        raise InputError("a stream needs at least one shift")
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities):
        raise InputError(f"severities must be in 1–5, got {severities}")


def mixed_stream(n: int, shifts: list[str], severities: list[int], seed: int = 0) -> list[StreamItem]:
    _check(n, shifts, severities)
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(n)
    kinds = rng.integers(len(shifts), size=n)
    sev = rng.integers(len(severities), size=n)
    return [StreamItem(int(q), shifts[k], severities[s]) for q, k, s in zip(order, kinds, sev)]


def source_share_stream(n: int, shifts: list[str], severities: list[int], seed: int = 0,
                        start: float = 0.5, end: float = 0.0) -> list[StreamItem]:
    _check(n, shifts, severities)
    if not (0 <= end <= 1 and 0 <= start <= 1):
        raise InputError(f"clean shares must be in [0, 1], got start={start}, end={end}")
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(n)
    share = np.linspace(start, end, n)
    items = []
    for t, q in enumerate(order):
        if rng.random() < share[t]:
            items.append(StreamItem(int(q), CLEAN, 0))
        else:
            items.append(StreamItem(int(q), shifts[int(rng.integers(len(shifts)))],
                                    severities[int(rng.integers(len(severities)))]))
    return items
