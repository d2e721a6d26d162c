"""Checks of the arguments kvckpt's constructors and functions take.

A wrong argument fails where it was passed, as InvalidArgumentError naming it and what it takes,
rather than as a TypeError from a thread pool or a hang against a zero timeout in the middle of a
save. ``where`` names the callable the user called (``KVStorageWriter``), as the message shows it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Collection, Iterable
from typing import Any

from kvckpt.errors import InvalidArgumentError


def whole(where: str, least: int, /, *, none: bool = False, **values: object) -> None:
    """Each of ``values`` is an int >= ``least`` (a bool is not a number here); None passes where
    ``none`` is set, for the arguments whose None means "no limit" or "not given"."""
    for name, value in values.items():
        if value is None and none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            other = " or None" if none else ""
            raise InvalidArgumentError(
                f"{where}: {name}={value!r:.60}: expected a whole number >= {least}{other}",
                options=[name],
            )


def seconds(where: str, /, *, none: bool = False, **values: object) -> None:
    """Each of ``values`` is a number of seconds > 0; None passes where ``none`` is set."""
    for name, value in values.items():
        if value is None and none:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            other = " or None" if none else ""
            raise InvalidArgumentError(
                f"{where}: {name}={value!r:.60}: expected a number of seconds > 0{other}",
                options=[name],
            )


def mapping(name: str, value: object) -> None:
    """``value`` is a dict of keyword options (or None)."""
    if value is not None and not isinstance(value, dict):
        raise InvalidArgumentError(
            f"{name} takes a dict of keyword options, got {type(value).__name__}; "
            f"pass e.g. {name}={{'timeout': 30}}",
            options=[name],
        )


def keywords(
    where: str, given: Iterable[str], func: Callable[..., Any], *, taken: Collection[str] = ()
) -> None:
    """Every name in ``given`` is a keyword ``func`` takes and the caller does not set itself
    (``taken``), checked before ``func`` is called so that a typo is named with the closest
    keyword, not as Python's TypeError when the call finally happens."""
    params = inspect.signature(func).parameters.values()
    known = sorted(
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in {"self", *taken}
    )
    names = list(given)
    clash = sorted(set(names) & set(taken))
    if clash:
        raise InvalidArgumentError(
            f"{where} sets {', '.join(map(repr, clash))} itself; leave it out", options=clash
        )
    unknown = sorted(set(names) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"{where}: unknown keyword(s) {', '.join(map(repr, unknown))}{hint} "
            f"(it takes: {', '.join(known)})",
            options=unknown,
        )
