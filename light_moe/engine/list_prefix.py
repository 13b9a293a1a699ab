"""ListPrefix: a read-only view of the first n items of a list that only ever grows.

A split server's API process builds a RequestOutput per token of every request, each holding the token ids and
logprobs so far. Copying them for each output made a request's outputs cost O(n^2) in its length; an unfinished
output carries this view of the request's own lists instead (engine/request_state.py's FrontendState: the lists
are appended to, never changed), and the finished one a copy. It reads as the list it stands for: len, indexing,
slices (lists), iteration, == with a list.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import islice


class ListPrefix(Sequence):
    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int):
        self._items = items
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        n = self._n
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._items[start:stop]
            return [self._items[i] for i in range(start, stop, step)]
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("list index out of range")
        return self._items[index]

    def __iter__(self):
        return islice(self._items, self._n)

    def __eq__(self, other) -> bool:
        if isinstance(other, ListPrefix):
            other = list(other)
        if not isinstance(other, list):
            return NotImplemented
        return len(other) == self._n and self._items[:self._n] == other

    __hash__ = None  # unhashable, as a list

    def __repr__(self) -> str:
        return repr(self._items[:self._n])
