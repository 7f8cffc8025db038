"""Half-open integer ranges [begin, end): the one merge that era blocks, resync regions and the
byte ranges a failover left all go through."""

from __future__ import annotations

from typing import Iterable


def merge(*range_lists: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of all lists as one sorted list; overlapping or touching ones joined, empty
    ones dropped."""
    out: list[tuple[int, int]] = []
    for b, e in sorted(r for ranges in range_lists for r in ranges):
        if b >= e:
            continue
        if out and b <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((b, e))
    return out
