"""The formats' caches count their builds globally and per thread: the inspector's "came from
the cache" flag reads the per-thread count, which another request building on another worker
thread at the same time does not move."""

from __future__ import annotations

import threading

from glmserve.formats.caches import cache_misses, cached, clear_caches, thread_cache_misses


@cached(maxsize=8)
def square(x: int) -> int:
    return x * x


def test_misses_are_counted_globally_and_per_thread() -> None:
    clear_caches()
    mine, everyone = thread_cache_misses(), cache_misses()
    assert square(3) == 9 and square(3) == 9  # one build, one hit
    assert (thread_cache_misses(), cache_misses()) == (mine + 1, everyone + 1)

    seen: list[int] = []

    def other() -> None:
        before = thread_cache_misses()
        square(4)
        seen.append(thread_cache_misses() - before)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [1]  # the other thread counted its build...
    assert (thread_cache_misses(), cache_misses()) == (mine + 1, everyone + 2)  # ...this one did not
    assert square.__name__ == "square" and square.cache_info().misses == 2
