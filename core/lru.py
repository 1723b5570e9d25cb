"""A bounded keep-in-process cache: the value of a key computed once, the least recently used dropped first."""
from __future__ import annotations

import collections
from typing import Any, Callable, Hashable


def get_or_compute(cache: collections.OrderedDict, key: Hashable, compute: Callable[[], Any], max_items: int) -> Any:
    """`cache[key]` (now the most recent), else `compute()`, kept with at most `max_items` entries."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = compute()
    while len(cache) > max_items:
        cache.popitem(last=False)
    return value
