"""The wire: the msgpack-rpc protocol, the one client, the daemon's address and the spawner.
No torch and no engine: the language server imports this room (tests/test_boundaries.py)."""
