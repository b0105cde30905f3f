"""Who this node is, for a gateway in front of many: a stable `node_id` and an
`incarnation` that is new at every supervisor start.

A gateway keys what it remembers about a backend (LiteLLM's cooldowns, by `model_info.id`)
on an id; a node that restarted is a new backend with nothing to remember, so the id it is
known by includes the incarnation (docs/fleet.md).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass

from .config import NeuronConfig

NODE_HEADER = "X-Neuron-Node"
INCARNATION_HEADER = "X-Neuron-Incarnation"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    incarnation: str
    started_at: float  # Unix time of the supervisor start this incarnation names

    @classmethod
    def new(cls, config: NeuronConfig) -> NodeIdentity:
        return cls(config.node_id or default_node_id(config.port), secrets.token_hex(6),
                   time.time())

    def to_json(self) -> dict[str, str | float]:
        return {"node_id": self.node_id, "incarnation": self.incarnation,
                "started_at": round(self.started_at, 3)}


def default_node_id(port: int) -> str:
    """The host name and the port: host names collide (two nodes on one host, `localhost`
    on many), the pair does not on one host."""
    return f"{socket.gethostname()}:{port}"


def is_loopback(address: str | None) -> bool:
    """Whether an address (a peer's, or the `host` to listen on) is this host's loopback:
    127.0.0.0/8, ::1, IPv4-mapped loopback, `localhost`."""
    if not address:
        return False
    if address.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
