"""The DCP adapter: the only part of kvckpt that imports torch."""
