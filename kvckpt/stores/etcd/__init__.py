"""etcd v3 backend: client.py (endpoints, auth, one pipelined call path), wire.py (the protobuf
messages, hand-encoded) and store.py (the KVStore mapping: txns, leases, limits)."""
