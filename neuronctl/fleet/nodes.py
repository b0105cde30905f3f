"""Many nodes behind one endpoint: reading nodes, and LiteLLM's proxy config built from them.

neuronctl writes no gateway. LiteLLM's proxy already balances one `model_name` over many
deployments, retries on another, and cools down the ones that fail (docs/fleet.md); what a
node adds is an exact list of what it can serve and an id that changes when it restarts.

Reading is `read_nodes` (the network); everything else here is pure functions over the
JSON the nodes answered, so the rules (what is servable, what a deployment is called) are
tested without processes. Nothing here reads `NEURON_FLEET_*` or any other variable: the
node treats every `NEURON_*` variable as config and refuses unknown ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..client import ApiError, Client, DaemonNotRunning
from ..keys import INFERENCE, Principal

# The router settings measured with LiteLLM 1.108 on two nodes (docs/fleet.md): a node
# killed with SIGKILL costs at most one failed request, a node that answers 404 (the model
# was unloaded there) none, because the request is retried on another deployment.
ROUTER_SETTINGS: dict[str, Any] = {
    "routing_strategy": "simple-shuffle",
    "num_retries": 2,
    # The first failure cools a deployment down: a dead node is not tried again for a while.
    "allowed_fails": 0,
    "cooldown_time": 10,
    # A 404 is otherwise final; here it means "not on this node", so another one is tried.
    "retry_policy": {"NotFoundErrorRetries": 2},
}
# The key clients send to the proxy; LiteLLM refuses to start without one. From the
# proxy's environment, so the file holds no secret of the proxy's own.
GENERAL_SETTINGS: dict[str, Any] = {"master_key": "os.environ/LITELLM_MASTER_KEY"}
# Several proxies share cooldowns and usage through Redis; where it is comes from each
# proxy's environment, as LiteLLM's docs write it.
REDIS_SETTINGS: dict[str, Any] = {"redis_host": "os.environ/REDIS_HOST",
                                  "redis_port": "os.environ/REDIS_PORT",
                                  "redis_password": "os.environ/REDIS_PASSWORD"}
# The warm-first routing hook (warm_first.py), written beside the config under this name
# and named in `litellm_settings: callbacks:` as MODULE.INSTANCE.
HOOK_MODULE = "neuron_routing"
HOOK_CALLBACK = f"{HOOK_MODULE}.warm_first"
SERVABLE_NOW = "loaded"
# The fleet commands take the nodes' key from --api-key, never from a config file.
KEY_HINT = "set NEURON_API_KEY, or pass --api-key"


@dataclass(frozen=True)
class Node:
    """What one node answered, or why it did not."""

    url: str
    node_id: str | None = None
    incarnation: str | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.error is None


def read_node(url: str, api_key: str | None, timeout_s: float, *,
              as_proxy: bool = False) -> Node:
    """`GET /models` and `GET /discovery` of the node at `url` (a normalized base URL);
    `as_proxy`: as the proxy that sends `api_key` will be served (`within_key`)."""
    client = Client(url, timeout_s, api_key, key_hint=KEY_HINT)
    try:
        models = client.request("GET", "/models")
        host = client.request("GET", "/discovery")
    except DaemonNotRunning:
        return Node(url, error="not answering (connection refused or no route)")
    except ApiError as exc:
        return Node(url, error=exc.message)
    node = node_from_answers(url, models, host)
    if not as_proxy:
        return node
    try:
        me = client.request("GET", "/keys/self")
    except (DaemonNotRunning, ApiError):
        me = None  # a node older than keys: nothing to judge the key by
    return within_key(node, me)


def within_key(node: Node, me: Any) -> Node:
    """The node as the key the proxy will send sees it (`me`: its `GET /keys/self`): the
    models of the key's scope only (a request for another is refused), and none at all,
    with the reason, when the key may not run inference there (every request refused)."""
    if not node.answered or not isinstance(me, dict) or not isinstance(me.get("roles"), list):
        return node
    patterns = me.get("models")
    if not isinstance(patterns, list):
        patterns = []
    key = Principal(str(me.get("name")), frozenset(map(str, me["roles"])),
                    tuple(map(str, patterns)))
    if not key.has(INFERENCE):
        return Node(node.url, error=f"the key given ({key.name}) lacks the inference role "
                                    f"there (it has: {', '.join(sorted(key.roles)) or 'none'})"
                                    "; the proxy's requests would be refused: give a key "
                                    "with the inference and read roles")
    return Node(node.url, node.node_id, node.incarnation,
                [m for m in node.models if key.may_use(str(m["id"]))])


def node_from_answers(url: str, models: Any, host: Any) -> Node:
    """A `Node` from a node's `/models` and `/discovery` bodies, checked: a node that does not
    name itself cannot be told apart from the next one, so it is left out."""
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                               for m in models):
        return Node(url, error="GET /models did not answer a list of models")
    if not isinstance(host, dict):
        return Node(url, error="GET /discovery did not answer an object")
    node_id, incarnation = host.get("node_id"), host.get("incarnation")
    if not isinstance(node_id, str) or not isinstance(incarnation, str) or not node_id \
            or not incarnation:
        return Node(url, error="its /discovery names no node_id and incarnation "
                               "(a neuronctl older than the fleet commands?)")
    return Node(url, node_id, incarnation, models)


def read_nodes(urls: Sequence[str], api_key: str | None, timeout_s: float, *,
               as_proxy: bool = False) -> list[Node]:
    """Every node at once (one slow node costs `timeout_s`, not one per node), in order."""
    if not urls:
        return []
    from concurrent.futures import ThreadPoolExecutor  # here: `neuronctl status` never needs it

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        return list(pool.map(lambda u: read_node(u, api_key, timeout_s, as_proxy=as_proxy),
                             urls))


def servable(model: dict[str, Any]) -> bool:
    """Whether a request for this model sent to its node is answered: it is loaded, or it is a
    catalogue model with autoload (the request loads it and waits in its queue)."""
    return model.get("status") == SERVABLE_NOW or model.get("autoload") is True


def deployment_id(node_id: str, incarnation: str, model_id: str) -> str:
    """LiteLLM's `model_info.id`. Its cooldowns are keyed by it and outlive the deployment,
    so a restarted node (a new incarnation) must not inherit its old one's: the id changes
    with the incarnation. Node ids hold no `/` or `@` (config.py), so it parses back."""
    return f"{node_id}@{incarnation}/{model_id}"


def deployments(node: Node, api_key: str | None) -> list[dict[str, Any]]:
    """One LiteLLM deployment per servable model of an answering node."""
    if node.node_id is None or node.incarnation is None:
        return []
    return [
        {
            "model_name": m["id"],
            "litellm_params": {
                # LiteLLM's OpenAI-compatible provider: it strips `openai/` and sends the
                # rest as the request's `model`, which is the id the node routes by.
                "model": f"openai/{m['id']}",
                "api_base": f"{node.url}/v1",
                # The provider needs a key even when the node has none; the node then
                # ignores it.
                "api_key": api_key or "none",
            },
            "model_info": {"id": deployment_id(node.node_id, node.incarnation, m["id"])},
        }
        for m in node.models if servable(m)
    ]


@dataclass(frozen=True)
class FleetConfig:
    config: dict[str, Any]
    left_out: list[tuple[str, str]]  # (url, why) of each node not in the config

    @property
    def complete(self) -> bool:
        return not self.left_out

    @property
    def empty(self) -> bool:
        return not self.config["model_list"]


def litellm_config(nodes: Iterable[Node], api_key: str | None,
                   redis: bool = False, routing_hook: bool = False) -> FleetConfig:
    """LiteLLM proxy config for `nodes`: their deployments and the router settings (with
    `redis`, those that make several proxies one; with `routing_hook`, the callback that
    prefers warm nodes, whose file the caller writes beside the config). A node
    that did not answer, or that answers under a node id already seen at another URL (two
    nodes configured alike, or one node named twice), is left out and reported."""
    model_list: list[dict[str, Any]] = []
    left_out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for node in nodes:
        if not node.answered or node.node_id is None:
            left_out.append((node.url, node.error or "no node id"))
            continue
        if node.node_id in seen:
            left_out.append((node.url, f"node id {node.node_id!r} is also the one of "
                                       f"{seen[node.node_id]} (set node_id in one of them)"))
            continue
        seen[node.node_id] = node.url
        model_list += deployments(node, api_key)
    router = {**ROUTER_SETTINGS, **(REDIS_SETTINGS if redis else {})}
    config: dict[str, Any] = {"model_list": model_list, "router_settings": router,
                              "general_settings": dict(GENERAL_SETTINGS)}
    if routing_hook:
        config["litellm_settings"] = {"callbacks": [HOOK_CALLBACK]}
    return FleetConfig(config, left_out)


def hook_source() -> bytes:
    """The routing hook's file as the proxy imports it: warm_first.py, which imports
    nothing of neuronctl, as shipped in this package."""
    from importlib import resources

    return (resources.files(__package__) / "warm_first.py").read_bytes()


def render(config: FleetConfig, urls: Sequence[str]) -> str:
    """The config as LiteLLM reads it. JSON is YAML (LiteLLM loads config.yaml with
    yaml.safe_load), so this needs no YAML library; the header is a YAML comment."""
    header = [f"# Generated by `neuronctl fleet litellm-config {' '.join(urls)}`; "
              "regenerate rather than edit."]
    header += [f"# Left out: {url}: {why}" for url, why in config.left_out]
    return "\n".join(header) + "\n" + json.dumps(config.config, indent=2) + "\n"


def status_rows(nodes: Iterable[Node]) -> list[dict[str, Any]]:
    """`neuronctl fleet status`: one row per model per node; a node with no models or no
    answer is one row of its own (model None)."""
    rows: list[dict[str, Any]] = []
    for node in nodes:
        base = {"url": node.url, "node_id": node.node_id, "incarnation": node.incarnation}
        if not node.answered:
            rows.append({**base, "model": None, "error": node.error})
            continue
        if not node.models:
            rows.append({**base, "model": None, "error": None})
        for m in node.models:
            rows.append({**base, "model": m, "error": None})
    return rows
