"""Finding, inspecting, verifying and removing committed checkpoints, and collecting what no record
names. Torch-free, so the command line answers without importing torch."""
