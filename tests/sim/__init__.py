"""Deterministic simulation of kvckpt's actors against one in-memory store (docs/reliability.md).

``store`` is the store whose every operation is a scheduling point, ``scheduler`` runs each actor
in its own thread and lets exactly one proceed at a time, ``world`` holds the actors, the faults and
the invariants, ``test_simulation`` runs many seeds, and ``python -m tests.sim`` runs seeds outside
pytest (the test runs it in child processes, with ``PYTHONHASHSEED=0``, so that a seed replays
exactly: kvckpt iterates a few sets of strings, whose order depends on the hash seed).
"""
