"""Many nodes behind LiteLLM's proxy: reading nodes, writing the proxy's config, and the
routing hook the proxy runs (warm_first.py, which imports nothing of neuronctl).

Never imports the daemon side nor aiohttp.
"""
