"""Many nodes behind LiteLLM's proxy: reading nodes and writing the proxy's config.

Never imports the daemon side nor aiohttp.
"""
