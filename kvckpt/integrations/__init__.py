"""Adapters that let frameworks reach kvckpt through the paths they already take.

See docs/integrations.md.
"""
