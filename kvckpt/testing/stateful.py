"""The KVStore contract as a hypothesis state machine, checked against a dict model.

Random sequences of create, put, swap, take, expire, persist, delete and scan run on a real store and
on a dict; every reply must match the model. Used by ``StoreTests.test_contract_against_a_model`` on
every backend; needs ``hypothesis`` (a test dependency, not a runtime one).
"""

from __future__ import annotations

import uuid
from typing import Protocol

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvckpt.store import KVStore

#: A few keys, so that operations collide often; one with characters a key codec can get wrong.
KEYS = st.sampled_from(["a", "b", "c/d", "ключ ✓", "e*f?[g]"])
VALUES = st.binary(max_size=64)
#: Long enough never to lapse during a run: the model does not model time passing.
TTL = 300.0


class RawAccess(Protocol):
    """Reads the server directly, bypassing the store under test."""

    def get(self, key: str) -> bytes | None: ...

    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; None when it has no expiry (or does not exist)."""


def check_contract(
    store: KVStore, raw: RawAccess | None = None, *, max_examples: int = 12, steps: int = 25
) -> None:
    """Run the state machine on ``store`` (each example under a fresh key prefix)."""

    class Contract(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.prefix = f"stateful/{uuid.uuid4().hex}/"
            self.model: dict[str, bytes] = {}
            self.expiring: set[str] = set()

        def full(self, key: str) -> str:
            return self.prefix + key

        def forget(self, key: str) -> None:
            self.model.pop(key, None)
            self.expiring.discard(key)

        @rule(key=KEYS, value=VALUES)
        def put(self, key: str, value: bytes) -> None:
            assert store.put(self.full(key), value) is True
            self.model[key] = value
            self.expiring.discard(key)

        @rule(key=KEYS, value=VALUES)
        def create(self, key: str, value: bytes) -> None:
            written = store.put(self.full(key), value, create=True)
            assert written is (key not in self.model)
            if written:
                self.model[key] = value

        @rule(key=KEYS, value=VALUES)
        def swap(self, key: str, value: bytes) -> None:
            assert store.swap(self.full(key), value) == self.model.get(key)
            self.model[key] = value
            self.expiring.discard(key)

        @rule(key=KEYS)
        def take(self, key: str) -> None:
            assert store.take(self.full(key)) == self.model.get(key)
            self.forget(key)

        @rule(keys=st.lists(KEYS, max_size=3), persist=st.booleans())
        def expire(self, keys: list[str], persist: bool) -> None:
            found = store.expire_many([self.full(k) for k in keys], None if persist else TTL)
            assert found == [k in self.model for k in keys]
            for key in keys:
                if key in self.model:
                    (self.expiring.discard if persist else self.expiring.add)(key)

        @rule(keys=st.lists(KEYS, max_size=3))
        def delete(self, keys: list[str]) -> None:
            store.delete_many([self.full(k) for k in keys])
            for key in keys:
                self.forget(key)

        @rule(key=KEYS)
        def scan(self, key: str) -> None:
            below = self.full(key[:1])
            expected = {self.full(k) for k in self.model if self.full(k).startswith(below)}
            assert set(store.scan_prefix(below)) == expected

        @invariant()
        def values_match(self) -> None:
            keys = [self.full(k) for k in self.model]
            assert store.get_many(keys) == list(self.model.values())

        @invariant()
        def the_server_agrees(self) -> None:
            if raw is None:
                return
            for key, value in self.model.items():
                assert raw.get(self.full(key)) == value
                remaining = raw.ttl(self.full(key))
                if key in self.expiring:
                    assert remaining is not None and 0 < remaining <= TTL
                else:
                    assert remaining is None

        def teardown(self) -> None:
            store.delete_prefix(self.prefix)

    Contract.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=steps, deadline=None)
    run_state_machine_as_test(Contract, settings=Contract.TestCase.settings)
