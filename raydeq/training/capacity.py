"""What the cluster can provide: its node types and how many nodes of each it may have.

Trials claim GPUs and run as many at once as the autoscaler can provide nodes for, not as many
as are up when the experiment starts (right after `ray up` no GPU node has joined yet). The node
types come from the cluster config in the GCS, which none of Ray 2.60's autoscalers writes and
where `publish` writes the autoscaling config that `ray up` leaves on the head node
(cluster.yaml runs `python -m raydeq.training.capacity` there); a cluster without one is the
nodes alive now.

    python -m raydeq.training.capacity AUTOSCALING_CONFIG   # on the head node, after ray start
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray._private.state
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_put

from raydeq.training.console import first_line

# Where the GCS keeps the cluster config (ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE and
# GCS_AUTOSCALER_CLUSTER_CONFIG_KEY), read back by ray._private.state.state.get_cluster_config.
NAMESPACE = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
CONFIG_KEY = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
UNBOUNDED = sys.maxsize
# What --help says beside the usage line, in 80 columns.
HELP = """\
Publish the node types of a `ray up` autoscaling config (YAML or JSON, such as
the head node's ~/ray_bootstrap_config.yaml) to the running cluster: then
raydeq.train and raydeq.tune claim GPUs, and tune counts its trials at once,
for every node the cluster may start, not only those up now. Run it on the head
node after `ray start`; exit status 2 for a file that is no autoscaling config."""
# Resource amounts are divided with this slack so that 0.6 / 0.2 (2.9999999999999996 in floats)
# counts 3 workers, not 2.
SLACK = 1e-9


@dataclass(frozen=True)
class NodeType:
    """A kind of node: the resources of one node and the most nodes of it (-1: no limit)."""

    resources: Mapping[str, float]
    max_count: int


def node_types() -> list[NodeType]:
    """The cluster's node types: the autoscaler's from the GCS, else one per node alive now."""
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [NodeType(dict(g.resources), g.max_count) for g in config.node_group_configs]
    return [NodeType(node["Resources"], 1) for node in ray.nodes() if node["Alive"]]


def can_have(resource: str) -> bool:
    """True when some node type the cluster may start has `resource` (e.g. "GPU")."""
    return any(t.resources.get(resource, 0) > 0 and t.max_count != 0 for t in node_types())


def worker_slots(need: Mapping[str, float]) -> int:
    """How many workers needing `need` each fit on every node the cluster may have at once,
    packed node by node (a worker never spans two nodes); UNBOUNDED without a node limit."""
    slots = 0
    for node_type in node_types():
        per_node = min(
            int(node_type.resources.get(key, 0) / amount + SLACK)
            for key, amount in need.items()
            if amount > 0
        )
        if per_node and node_type.max_count < 0:
            return UNBOUNDED
        slots += per_node * node_type.max_count
    return slots


def slots_now(need: Mapping[str, float], free: bool = False) -> int:
    """How many workers needing `need` each the nodes alive now hold, packed node by node; with
    `free`, in what other jobs leave free of them."""
    state = ray._private.state
    nodes = state.available_resources_per_node() if free else state.total_resources_per_node()
    return sum(
        min(int(node.get(key, 0) / amount + SLACK) for key, amount in need.items() if amount > 0)
        for node in nodes.values()
    )


def cluster_config(autoscaling: Mapping[str, Any]) -> autoscaler_pb2.ClusterConfig:
    """The GCS cluster config of an autoscaling config (the cluster.yaml `ray up` fills out):
    one node group per node type, the head type counting the head node itself; a type that
    neither it nor the config limits has the count -1, Ray's "no limit" (its int32 field holds
    no larger one)."""
    config = autoscaler_pb2.ClusterConfig()
    limit = autoscaling.get("max_workers", UNBOUNDED)
    head = autoscaling.get("head_node_type")
    for name, node_type in autoscaling["available_node_types"].items():
        extra = int(name == head)  # the head node; its type adds no workers unless it says so
        workers = min(node_type.get("max_workers", 0 if extra else limit), limit)
        group = config.node_group_configs.add(
            name=name,
            min_count=node_type.get("min_workers", 0) + extra,
            max_count=-1 if workers == UNBOUNDED else workers + extra,
        )
        for key, amount in node_type.get("resources", {}).items():
            group.resources[key] = int(amount)
    return config


def publish(autoscaling: Mapping[str, Any]) -> None:
    """Write the node types of an autoscaling config into the GCS of the connected cluster."""
    data = cluster_config(autoscaling).SerializeToString()
    _internal_kv_put(CONFIG_KEY, data, overwrite=True, namespace=NAMESPACE)


def main(argv: list[str]) -> int:
    """Publish the node types of the autoscaling config file `argv[0]` (YAML or JSON)."""
    import yaml

    usage = "usage: python -m raydeq.training.capacity AUTOSCALING_CONFIG"
    if argv in (["-h"], ["--help"]):
        print(f"{usage}\n\n{HELP}")
        return 0
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as file:
            autoscaling = yaml.safe_load(file)  # `ray up` writes JSON, which YAML reads too
        node_types = autoscaling["available_node_types"]
        cluster_config(autoscaling)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as err:
        reason = first_line(err)
        print(f"error: {argv[0]}: not an autoscaling config ({reason})", file=sys.stderr)
        return 2
    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    publish(autoscaling)
    shown = {name: node_type.get("resources", {}) for name, node_type in node_types.items()}
    print(f"node types published: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
