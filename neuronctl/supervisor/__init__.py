"""One worker, one model's life, the node's table: harnesses, worker processes, the
restart policy, lifecycles, the registry, activation, eviction, reload, workers.json.

May import `models` and the foundation; never aiohttp's server (the HTTP layer calls in).
"""
