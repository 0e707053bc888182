"""One reader connection per thread, shared by both store backends (:mod:`patchd.store.db`,
:mod:`patchd.store.postgres`): opened on a thread's first read, all closed together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")


class ThreadReaders(Generic[C]):
    """This thread's connection from ``connect`` (made once per thread), and every one made."""

    def __init__(self, connect: Callable[[], C]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._made: list[C] = []
        self._lock = threading.Lock()

    def get(self) -> C:
        conn: C | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._made.append(conn)
        return conn

    def close_all(self, close: Callable[[C], None]) -> None:
        with self._lock:
            for conn in self._made:
                close(conn)
            self._made.clear()
