"""The save protocol the DCP writer, gc and the management commands share: the conditional commit and
the liveness marker (docs/protocol.md)."""
