"""The caches of built grammars and schema checks, registered so tests can empty them all.

Apart from :mod:`glmserve.formats.grammar` (which re-exports both names) so that any module of
``formats/`` may cache without importing the grammar builder, which imports ``base``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache, wraps
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])
_CACHES: list[Any] = []
_THIS_THREAD = threading.local()


def cached(maxsize: int) -> Callable[[_F], _F]:
    """``functools.lru_cache`` registered with :func:`clear_caches`, whose misses are also
    counted per thread (:func:`thread_cache_misses`)."""

    def wrap(fn: _F) -> _F:
        @wraps(fn)
        def built(*args: Any, **kwargs: Any) -> Any:  # runs only on a miss
            _THIS_THREAD.misses = getattr(_THIS_THREAD, "misses", 0) + 1
            return fn(*args, **kwargs)

        wrapped = lru_cache(maxsize=maxsize)(built)
        _CACHES.append(wrapped)
        return wrapped  # type: ignore[return-value]

    return wrap


def clear_caches() -> None:
    """Forget every built grammar and schema check (tests measure cold build time with it)."""
    for fn in _CACHES:
        fn.cache_clear()


def cache_misses() -> int:
    """How many grammars and schema checks have been built so far (every cache's misses): the
    same number before and after building a constraint means it came whole from the caches."""
    return sum(fn.cache_info().misses for fn in _CACHES)


def thread_cache_misses() -> int:
    """The builds this thread has made so far: unlike :func:`cache_misses`, not moved by
    another request building its constraint on another worker thread at the same time, so a
    request that builds its constraint in one thread knows whether it came from the caches."""
    return getattr(_THIS_THREAD, "misses", 0)
