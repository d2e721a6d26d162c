"""The ``kvckpt`` command line: its commands, their output and progress, the demo, and the local
server it can start. Torch-free but for the demo, so ``kvckpt ls`` starts without importing torch."""
