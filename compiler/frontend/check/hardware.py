"""Hardware blocks: `link`, `gpu` and `cluster` with its `node` groups, and the link arguments
that nodes and networks take (`link nvlink4` or `link nvlink 450 GB/s`)."""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

from flowc.compiler import units
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check.vocabulary import (
    DTYPES,
    GPU_LINK_KINDS,
    LINK_KINDS,
    NETWORK_KINDS,
    OVERHEAD_KINDS,
    SCHEMAS,
    with_article,
)
from flowc.compiler.model.parallelism import divisors
from flowc.compiler.spec import GPU, MAX_CLUSTER_GPUS, MAX_COUNT, MAX_PRICE, Cluster, Link, NodeGroup
from flowc.compiler.units import Value, format_value

if TYPE_CHECKING:  # core imports this module to dispatch to it: the checker is only an annotation here
    from flowc.compiler.frontend.check.core import Checker


def build_link(c: Checker, decl: ast.Decl) -> Link | None:
    b = c.block(decl.body, "link", decl.name)
    kind = c.one_value(b, "kind", "link", lambda e: c.word(e, LINK_KINDS, "link kind"), True, "link")
    bandwidth = c.one_value(b, "bandwidth", "link", lambda e: c.positive(e, units.BANDWIDTH, "bandwidth"),
                            True, "link")
    latency = c.one_value(b, "latency", "link", lambda e: c.quantity(e, units.TIME))
    if kind is None or bandwidth is None:
        return None
    return Link(name=decl.name.text, kind=kind, bandwidth=bandwidth,
                latency=None if latency is None else float(latency), doc=decl.doc, location=c.location(decl))


def build_gpu(c: Checker, decl: ast.Decl) -> GPU | None:
    b = c.block(decl.body, "gpu", decl.name)
    r = lambda key, read, required=True: c.one_value(b, key, "gpu", read, required, "gpu")  # noqa: E731  (local shorthand)
    vendor = r("vendor", lambda e: c.word(e, ("nvidia", "amd", "cpu"), "vendor"))
    memory = r("memory", lambda e: c.count(e, "memory", 1, units.BYTES))
    bandwidth = r("memory_bandwidth", lambda e: c.positive(e, units.BANDWIDTH, "memory bandwidth"))
    interconnect = r("interconnect", lambda e: c.ref(e, "link"))
    host_link = r("host_link", lambda e: c.ref(e, "link"))
    price = r("price", lambda e: _price(c, e), False)
    flops = c.keyed(b, "flops", DTYPES, "dtype",
                    lambda e: c.positive(e, units.COMPUTE, "peak compute"))
    if not b.all("flops"):
        c.required(b, "flops", "gpu", "gpu")
    overheads = c.keyed(b, "overhead", OVERHEAD_KINDS, "overhead", lambda e: c.quantity(e, units.TIME))
    if None in (vendor, memory, bandwidth, interconnect, host_link) or not flops:
        return None
    return GPU(name=decl.name.text, vendor=vendor, memory=memory, memory_bandwidth=bandwidth, flops=flops,
               interconnect=interconnect.name, host_link=host_link.name, overheads=overheads,
               price=None if price is None else float(price * 3600), doc=decl.doc, location=c.location(decl))


def _link_arg(c: Checker, stmt: ast.Statement, schema: str, kinds: tuple[str, ...], what: str) -> Link | None:
    """`link nvlink4` (a named link) or `link nvlink 450 GB/s` (kind and bandwidth)."""
    args = stmt.args
    if len(args) >= 2 and isinstance(args[1], (ast.Quantity, ast.BinOp, ast.Paren, ast.Number)):
        kind = c.word(args[0], kinds, f"{what} kind")
        bandwidth = c.positive(args[1], units.BANDWIDTH, "bandwidth")
        if kind is None or bandwidth is None:
            return None
        return Link(name=f"{kind}-{format_value(Value(Fraction(bandwidth), units.BANDWIDTH)).replace(' ', '')}",
                    kind=kind, bandwidth=bandwidth)
    if not args:
        c.args(stmt, schema, 1)
        return None
    link = c.ref(args[0], "link")
    if link is not None and link.kind not in kinds:
        c.error("F0306", f"`{link.name}` is {with_article(link.kind)} link, which cannot serve as {what}", args[0].span,
                f"{link.kind} link", f"{what} takes a link of kind " + " or ".join(f"`{k}`" for k in kinds))
        return None
    return link


def _price(c: Checker, expr: ast.Expr):
    price = c.quantity(expr, units.PRICE)
    return price if price is None or c.within(expr, "a price", price, MAX_PRICE) else None


def _times(c: Checker, args: tuple[ast.Expr, ...], what: str) -> tuple[tuple[ast.Expr, ...], int | None]:
    """Split a trailing `x N` off the arguments."""
    if len(args) >= 2 and isinstance(args[-2], ast.Name) and args[-2].text == "x":
        return args[:-2], c.count(args[-1], what, maximum=MAX_COUNT)
    return args, 1


def build_cluster(c: Checker, decl: ast.Decl) -> Cluster | None:
    b = c.block(decl.body, "cluster", decl.name)
    nodes = [_node(c, stmt) for stmt in b.all("node")]
    if not b.all("node"):
        c.required(b, "node", "cluster", "cluster")
    network, nics = None, 1
    stmt = b.one("network")
    if stmt is not None:
        rest, nics = _times(c, stmt.args, "the number of NICs per node")
        network = _link_arg(c, ast.Statement(stmt.key, rest, None, stmt.span), "cluster", NETWORK_KINDS, "a network")
    if any(n is None for n in nodes) or nics is None or not nodes or (stmt is not None and network is None):
        return None
    if sum(n.count for n in nodes) > 1 and network is None:
        c.error("F0310", f"cluster `{decl.name.text}` has several nodes but no `network`", decl.name.span,
                "nodes cannot reach each other", "add `network ib-ndr x 8` (from std.links)")
        return None
    cluster = Cluster(name=decl.name.text, nodes=nodes, network=network, network_nics=nics, doc=decl.doc,
                      location=c.location(decl))
    if cluster.total_gpus > MAX_CLUSTER_GPUS:
        c.error("F0307", f"cluster `{cluster.name}` has {cluster.total_gpus:,} GPUs; flowc plans at most "
                f"{MAX_CLUSTER_GPUS:,}", decl.name.span, "too many GPUs",
                "declare the nodes you deploy on (`node x N`, `gpu NAME x N`)")
        return None
    return cluster


def _node(c: Checker, stmt: ast.Statement) -> NodeGroup | None:
    args, count = _times(c, stmt.args, "the number of nodes")
    name = None
    if len(args) > 1 or (args and not isinstance(args[0], ast.Name)):
        c.error("F0305", "a node group is `node x N { ... }` or `node NAME x N { ... }`", stmt.span,
                "malformed node", f"write `{SCHEMAS['cluster']['node']}`")
        return None
    if args:
        name = args[0].text
    if stmt.body is None:
        c.error("F0305", "`node` needs a block with its GPUs", stmt.span, "no block",
                f"write `{SCHEMAS['cluster']['node']}`")
        return None
    b = c.block(stmt.body, "node", stmt.key)
    gpu_stmt = c.required(b, "gpu", "node", "node")
    gpu, per_node = None, None
    if gpu_stmt is not None:
        rest, per_node = _times(c, gpu_stmt.args, "the number of GPUs per node")
        if len(rest) != 1:
            c.args(ast.Statement(gpu_stmt.key, rest, None, gpu_stmt.span), "node", 1)
        else:
            gpu = c.ref(rest[0], "gpu")
    link = host_link = None
    if b.one("link"):
        link = _link_arg(c, b.one("link"), "node", GPU_LINK_KINDS, "a link between GPUs")
    elif gpu is not None:
        link = c.build("link", gpu.interconnect)
    if b.one("host_link"):
        host_link = _link_arg(c, b.one("host_link"), "node", LINK_KINDS, "a host link")
    elif gpu is not None:
        host_link = c.build("link", gpu.host_link)
    domain = c.one_value(b, "link_domain", "node", lambda e: c.count(e, "link_domain"))
    host_memory = c.one_value(b, "host_memory", "node", lambda e: c.count(e, "host memory", 1, units.BYTES))
    price = c.one_value(b, "price", "node", lambda e: _price(c, e))
    if gpu is None or per_node is None or count is None or link is None or host_link is None:
        return None
    if domain is not None and per_node % domain:
        c.error("F0408", f"link_domain {domain} does not divide the node's {per_node} GPUs",
                b.one("link_domain").args[0].span, "uneven domains",
                "use one of: " + ", ".join(str(d) for d in divisors(per_node)))
        return None
    return NodeGroup(name=name, count=count, gpu=gpu.name, gpus_per_node=per_node, link=link,
                     link_domain=domain or per_node, host_memory=host_memory, host_link=host_link,
                     price=None if price is None else float(price * 3600))
