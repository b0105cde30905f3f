"""The node's HTTP surface, the only home of aiohttp's server: the app and its routes,
keys, cross-site checks, the connection guard, `/v1` routing and queues, the events
stream, logs, the dashboard, metrics, idle unloads.

May import `supervisor`, `models` and the foundation.
"""
