"""The tiered parts: copying checkpoints between stores and folders, draining them to durable storage,
and finding what a durable tier can restore."""
