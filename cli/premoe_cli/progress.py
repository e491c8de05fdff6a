"""tqdm progress bars on stderr fed by the library's progress callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar


class LazyBar:
    """A tqdm bar made on first use: a subclass's progress callback calls `open`, so a run
    that reports no progress shows no bar."""

    def __init__(self) -> None:
        self.bar: Any = None

    def open(self, **tqdm_kwargs: Any) -> Any:
        """The bar, made with `tqdm_kwargs` on the first call (later calls return it as is)."""
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(**tqdm_kwargs)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


B = TypeVar("B", bound=LazyBar)


@contextmanager
def closing(bar: B | None) -> Iterator[B | None]:
    """`bar` (None: no bar), closed when the block ends, however it ends."""
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
