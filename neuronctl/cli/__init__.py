"""The operator's commands (typer and rich; urllib through `neuronctl.client`).

Never imports the daemon side (`models`, `supervisor`, `api`, `node`) nor aiohttp.
"""
