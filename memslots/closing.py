"""Resources that are released with ``close()`` and can be used in ``with`` blocks."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Mixin: ``with resource:`` closes it on the way out; ``close()`` is the subclass's."""

    def close(self) -> None:
        """Release the resource (idempotent in every subclass)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
