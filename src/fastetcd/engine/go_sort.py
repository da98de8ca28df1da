"""Go 1.16's ``sort.Sort``, step for step.

etcd 3.5 sorts Range results with ``sort.Sort``, which is not stable: keys that tie on the sort target
(same version, same create revision, ...) come out in an order that only this exact algorithm reproduces.
A client comparing answers with etcd's must see the same order, so we run the same comparisons and swaps.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from typing import Any

Less = Callable[[Any, Any], bool]


def go_sort(data: MutableSequence[Any], less: Less) -> None:
    """Sort ``data`` in place exactly as Go 1.16's sort.Sort with this ``less`` would."""
    n = len(data)
    depth = 0
    i = n
    while i > 0:
        depth += 1
        i >>= 1
    _quick_sort(data, less, 0, n, depth * 2)


def _swap(d: MutableSequence[Any], i: int, j: int) -> None:
    d[i], d[j] = d[j], d[i]


def _insertion_sort(d: MutableSequence[Any], less: Less, a: int, b: int) -> None:
    for i in range(a + 1, b):
        j = i
        while j > a and less(d[j], d[j - 1]):
            _swap(d, j, j - 1)
            j -= 1


def _sift_down(d: MutableSequence[Any], less: Less, lo: int, hi: int, first: int) -> None:
    root = lo
    while True:
        child = 2 * root + 1
        if child >= hi:
            return
        if child + 1 < hi and less(d[first + child], d[first + child + 1]):
            child += 1
        if not less(d[first + root], d[first + child]):
            return
        _swap(d, first + root, first + child)
        root = child


def _heap_sort(d: MutableSequence[Any], less: Less, a: int, b: int) -> None:
    first, lo, hi = a, 0, b - a
    for i in range((hi - 1) // 2, -1, -1):
        _sift_down(d, less, i, hi, first)
    for i in range(hi - 1, -1, -1):
        _swap(d, first, first + i)
        _sift_down(d, less, lo, i, first)


def _median_of_three(d: MutableSequence[Any], less: Less, m1: int, m0: int, m2: int) -> None:
    if less(d[m1], d[m0]):
        _swap(d, m1, m0)
    if less(d[m2], d[m1]):
        _swap(d, m2, m1)
        if less(d[m1], d[m0]):
            _swap(d, m1, m0)


def _do_pivot(d: MutableSequence[Any], less: Less, lo: int, hi: int) -> tuple[int, int]:
    m = (lo + hi) >> 1
    if hi - lo > 40:
        s = (hi - lo) // 8
        _median_of_three(d, less, lo, lo + s, lo + 2 * s)
        _median_of_three(d, less, m, m - s, m + s)
        _median_of_three(d, less, hi - 1, hi - 1 - s, hi - 1 - 2 * s)
    _median_of_three(d, less, lo, m, hi - 1)

    pivot = lo
    a, c = lo + 1, hi - 1
    while a < c and less(d[a], d[pivot]):
        a += 1
    b = a
    while True:
        while b < c and not less(d[pivot], d[b]):
            b += 1
        while b < c and less(d[pivot], d[c - 1]):
            c -= 1
        if b >= c:
            break
        _swap(d, b, c - 1)
        b += 1
        c -= 1

    protect = hi - c < 5
    if not protect and hi - c < (hi - lo) // 4:
        dups = 0
        if not less(d[pivot], d[hi - 1]):
            _swap(d, c, hi - 1)
            c += 1
            dups += 1
        if not less(d[b - 1], d[pivot]):
            b -= 1
            dups += 1
        if not less(d[m], d[pivot]):
            _swap(d, m, b - 1)
            b -= 1
            dups += 1
        protect = dups > 1
    if protect:
        while True:
            while a < b and not less(d[b - 1], d[pivot]):
                b -= 1
            while a < b and less(d[a], d[pivot]):
                a += 1
            if a >= b:
                break
            _swap(d, a, b - 1)
            a += 1
            b -= 1
    _swap(d, pivot, b - 1)
    return b - 1, c


def _quick_sort(d: MutableSequence[Any], less: Less, a: int, b: int, max_depth: int) -> None:
    while b - a > 12:
        if max_depth == 0:
            _heap_sort(d, less, a, b)
            return
        max_depth -= 1
        mlo, mhi = _do_pivot(d, less, a, b)
        if mlo - a < b - mhi:
            _quick_sort(d, less, a, mlo, max_depth)
            a = mhi
        else:
            _quick_sort(d, less, mhi, b, max_depth)
            b = mlo
    if b - a > 1:
        for i in range(a + 6, b):
            if less(d[i], d[i - 6]):
                _swap(d, i, i - 6)
        _insertion_sort(d, less, a, b)
