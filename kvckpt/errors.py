"""Typed errors. Every failure kvckpt raises is a KVCheckpointError subclass.

They pickle with their attributes because DCP gathers exceptions across ranks.
"""

from __future__ import annotations

from typing import Any


class KVCheckpointError(Exception):
    """Base class of every kvckpt error."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        for name, value in context.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[KVCheckpointError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidCheckpointIdError(KVCheckpointError, ValueError):
    """The checkpoint_id / URL cannot be parsed or names no backend kvckpt has."""


class MissingDependencyError(KVCheckpointError, ImportError):
    """A backend needs an optional extra that is not installed."""


class CheckpointNotFoundError(KVCheckpointError, FileNotFoundError):
    """No committed record exists under the namespace."""


class CheckpointExistsError(KVCheckpointError, FileExistsError):
    """A committed checkpoint already exists and overwrite is off."""


class CorruptCheckpointError(KVCheckpointError):
    """Stored bytes disagree with the record: bad checksum, missing or short chunk, bad record."""

    #: Set where known: the damaged key, the tensor it belongs to, every problem found (verify).
    key: str
    fqn: str
    problems: list[str]


class CheckpointTooLargeError(KVCheckpointError):
    """The checkpoint exceeds what this backend is configured to hold."""

    nbytes: int
    limit: int


class StoreUnavailableError(KVCheckpointError, ConnectionError):
    """The store cannot be reached or stopped answering within the timeout."""


class StoreProtocolError(StoreUnavailableError):
    """The server answered with bytes that are not a reply of its protocol (a wrong type, a bad or
    absurd length, a line without end): another service at that address, or a stream altered on the
    way. Never retried: the same server would answer the same way."""

    #: The server, as the store names it.
    source: str


class StoreFullError(KVCheckpointError):
    """The store refused a write for lack of memory or quota."""


class UnsupportedTorchError(KVCheckpointError):
    """The installed torch lacks a private name kvckpt uses (DCP moved or removed it): the message
    names it, the installed torch and the range kvckpt is tested with."""

    #: The dotted name torch lacks, e.g. ``torch.distributed.checkpoint._storage_utils._storage_setup``.
    missing: str
    torch_version: str
    #: The oldest and newest torch kvckpt is tested with.
    tested: tuple[str, str]


class UnsafeStoreConfigError(KVCheckpointError):
    """The server is configured in a way that can lose checkpoint data (e.g. an evicting policy)."""


class ReplicationError(KVCheckpointError):
    """Fewer replicas acknowledged the writes than asked for: a failover could lose them."""


class UnsafeStoreConfigWarning(UserWarning):
    """The server's configuration can lose checkpoint data and the user opted in anyway."""


class CheckpointChangedError(KVCheckpointError):
    """The checkpoint was overwritten or deleted while it was being loaded; load it again."""


class StateDictMismatchError(KVCheckpointError, ValueError):
    """The state_dict to load into does not match the checkpoint: a key it lacks, or another shape."""


class UnloadedEntriesError(StateDictMismatchError):
    """``kvckpt.load(strict=True)``: the checkpoint holds entries under a key of the state_dict that
    no rank's state_dict has a place for (an optimizer.state_dict() without state, typically)."""

    #: The checkpoint's fqns that would be left unloaded, sorted.
    fqns: list[str]


class UnloadedEntriesWarning(UserWarning):
    """``kvckpt.load`` left entries of the checkpoint unloaded: the state_dict, under a key it has,
    had no place for them. Filter it, or pass ``strict=True`` to make it UnloadedEntriesError."""


class UnpicklableValueError(KVCheckpointError, TypeError):
    """A non-tensor value of the state_dict cannot be serialised (DCP stores such values with pickle)."""


class UnsafeObjectError(KVCheckpointError):
    """A stored non-tensor value needs classes a safe load refuses to construct (allow_pickle=False)."""


class InvalidArgumentError(KVCheckpointError, ValueError, TypeError):
    """An argument of a kvckpt constructor or function is wrong: a keyword or store option nobody
    takes (a typo, usually), or a value of the wrong type or out of range. The message names the
    argument (``.options`` lists them) and what it takes. The checkpoint_id itself, query included,
    is InvalidCheckpointIdError's.

    A ValueError and a TypeError both, so ``except`` clauses written for what these checks raised
    before (ValueError for a range, TypeError for an unknown store option) still catch it.
    """

    #: The arguments or store options at fault, as the caller spelled them.
    options: list[str]


#: Its name from when it covered store options alone, still documented and raised by that name.
InvalidStoreOptionError = InvalidArgumentError


class PickleLoadWarning(UserWarning):
    """A load unpickles non-tensor values from the store without restriction (it can run code)."""
