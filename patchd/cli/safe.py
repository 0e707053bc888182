"""Terminal-safe text: what serve returns (group values, ids, reasons) may hold anything a client
sent, so the CLI never writes it raw. Control characters (C0, DEL, C1, and the bidirectional
overrides) become visible escapes (``\\x1b``, ``\\u202e``), and rich markup in the value is not
interpreted (:func:`cell` returns a ``Text``, :func:`markup` escapes ``[``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def printable(value: object) -> str:
    """``str(value)`` with every control character written as its escape."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def markup(value: object) -> str:
    """:func:`printable`, with rich markup escaped, for an f-string rich renders."""
    from rich.markup import escape

    return escape(printable(value))


def cell(value: object) -> Text:
    from rich.text import Text

    return Text(printable(value))


def cells(values: Iterable[object]) -> tuple[Text, ...]:
    return tuple(cell(v) for v in values)
