"""The model engine: checkpoint loading, the network, the tokenizer, the samplers (exact and fast),
the KV caches and the text tasks. It imports torch; it imports neither `..rpc` nor `..serve`
(tests/test_boundaries.py holds it to that). `Engine` (api.py) is its public face."""
