"""`neuronctl start`: the daemon's process, its socket, signals, systemd and logging.

The top of the daemon side: may import every layer below it, but aiohttp only once
activation is over (the start path stays light).
"""
