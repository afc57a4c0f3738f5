"""Binary masks: 8-connected components (run-length union-find), painting them back, erosion and dilation."""

from __future__ import annotations

import numpy as np

__all__ = ["components", "dilate", "erode", "paint"]


def components(mask: np.ndarray) -> list[dict]:
    """8-connected components of a boolean mask as dicts with area, centroid (x, y), bbox and runs."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)
    ends_r, ends_c = np.nonzero(edges == -1)  # exclusive end column
    runs = list(zip(starts_r.tolist(), starts_c.tolist(), ends_c.tolist()))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = {}
    for i, (r, _, _) in enumerate(runs):
        row_first.setdefault(r, i)
    prev_lo = prev_hi = 0  # index range of the previous row's runs
    for r in sorted(row_first):
        lo = row_first[r]
        hi = lo
        while hi < len(runs) and runs[hi][0] == r:
            hi += 1
        if r - 1 in row_first:
            j = prev_lo
            for i in range(lo, hi):
                _, a0, a1 = runs[i]
                while j < prev_hi and runs[j][2] < a0:  # previous runs ending before (8-connectivity: end >= a0)
                    j += 1
                k = j
                while k < prev_hi and runs[k][1] <= a1:  # starts at most one past our end
                    ri, rk = find(i), find(k)
                    if ri != rk:
                        parent[max(ri, rk)] = min(ri, rk)
                    k += 1
        prev_lo, prev_hi = lo, hi
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(find(i), []).append(run)
    comps = []
    for group in groups.values():
        g = np.array(group, dtype=np.int64)
        lengths = g[:, 2] - g[:, 1]
        area = int(lengths.sum())
        cx = float(((g[:, 1] + g[:, 2] - 1) / 2 * lengths).sum() / area)
        cy = float((g[:, 0] * lengths).sum() / area)
        comps.append({"area": area, "centroid": (cx, cy), "runs": g,
                      "bbox": (int(g[:, 1].min()), int(g[:, 0].min()), int(g[:, 2].max()), int(g[:, 0].max()) + 1)})
    return comps


def paint(runs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for r, a, b in runs.tolist():
        out[r, a:b] = True
    return out


def erode(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary erosion by a (2 radius + 1) square; outside the canvas counts as background."""
    out = mask.copy()
    for _ in range(radius):
        m = out
        out = m.copy()
        out[1:] &= m[:-1]
        out[:-1] &= m[1:]
        out[0] = out[-1] = False
        m = out
        out = m.copy()
        out[:, 1:] &= m[:, :-1]
        out[:, :-1] &= m[:, 1:]
        out[:, 0] = out[:, -1] = False
    return out


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation by a (2 radius + 1) square."""
    out = mask.copy()
    for _ in range(radius):
        m = out
        out = m.copy()
        out[1:] |= m[:-1]
        out[:-1] |= m[1:]
        m = out
        out = m.copy()
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
    return out
