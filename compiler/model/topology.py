"""A cluster's nodes as plans number them, and the links between GPUs.

Plans name a GPU `GpuRef(node, index)`: `node` counts the cluster's nodes in declaration order
with node groups expanded (`node x 2` is nodes 0 and 1), `index` the GPU within its node.
"""

from __future__ import annotations

from typing import Optional

from flowc.compiler.plan import NodeGroupShape
from flowc.compiler.spec import GPU, Cluster, Link, NodeGroup


def cluster_nodes(cluster: Cluster) -> list[NodeGroup]:
    """The node group of every node of the cluster, in plan order."""
    return [group for group in cluster.nodes for _ in range(group.count)]


def cluster_shape(cluster: Cluster) -> list[NodeGroupShape]:
    """The cluster's node groups as a plan records them (`Plan.clusters`)."""
    return [NodeGroupShape(gpu=group.gpu, gpus=group.gpus_per_node, count=group.count) for group in cluster.nodes]


def gpu_link(cluster: Cluster, gpu: str) -> Link:
    """The link between GPUs of the first node group of GPU type `gpu`."""
    return next(group.link for group in cluster.nodes if group.gpu == gpu)


def gpu_price(group: NodeGroup, gpu: GPU) -> Optional[float]:
    """usd per GPU-hour of a GPU in `group`: the node's price split over its GPUs, else the GPU
    type's own price; None when neither is declared."""
    return group.price / group.gpus_per_node if group.price is not None else gpu.price


def gpu_prices(cluster: Cluster, gpus: dict[str, GPU]) -> dict[str, Optional[float]]:
    """usd per GPU-hour by GPU type on a cluster (its cheapest node group; None: no price)."""
    prices: dict[str, Optional[float]] = {}
    for group in cluster.nodes:
        price, known = gpu_price(group, gpus[group.gpu]), prices.get(group.gpu)
        if price is not None and (known is None or price < known):
            prices[group.gpu] = price
        prices.setdefault(group.gpu, price)
    return prices
