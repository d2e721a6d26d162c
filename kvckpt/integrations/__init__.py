"""Framework integrations: DCP's own entry points (the checkpoint_id hook), Lightning, and the fsspec
view of a checkpoint."""
