"""Test-only servers and helpers that the kvckpt package itself does not ship."""
