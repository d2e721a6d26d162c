"""Runnable examples from the README and docs (each file is a script; tests import them too)."""
