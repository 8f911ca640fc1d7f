"""Memory (F0524): every group's memory map against the one budget formula of the memory
model, and what the plans offload against each node's host memory."""

from __future__ import annotations

from flowc.compiler.model.lengths import longest_request
from flowc.compiler.model.memory import GPU_MEMORY_UTILIZATION, memory_budget
from flowc.compiler.model.step_graph import layout_problems
from flowc.compiler.model.topology import cluster_nodes
from flowc.compiler.units import format_gib
from flowc.compiler.verify.context import DeploymentCheck, Verifier


def check_memory(v: Verifier, dep: DeploymentCheck, host: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
    dp, d = dep.plan, dep.spec
    m = d.model
    for j, g in enumerate(dp.groups):
        if not dep.groups_ok.get(j, False):
            continue
        gat = f"deployments[{dep.index}].groups[{j}].memory"
        where = f"deployment `{dp.name}`, group {j}"
        mm, s = g.memory, g.scheduler
        gpu = v.spec.gpus[g.gpu]

        def fail(message: str, help: str, at: str = gat, notes=()) -> None:
            v.error("F0524", f"{where}: {message}", help, at=at, notes=notes, dep=dep)

        negative = [k for k in ("capacity", "weights", "kv_cache", "kv_blocks", "activations", "reserve", "free",
                                "offload_step_s")
                    if getattr(mm, k) < 0] + [f"offloaded.{k}" for k, n in mm.offloaded.items() if n < 0]
        if negative:
            fail("negative " + ", ".join(negative) + " in the memory map", "compile the plan again")
            continue
        b = memory_budget(m, gpu.memory, tp=g.tp, pp=g.pp, ep=g.ep, scheduler=s, vendor=gpu.vendor)
        shape = f"tp {g.tp} x pp {g.pp} on {gpu.name}, max_batched_tokens {s.max_batched_tokens}"
        if mm.capacity != gpu.memory:
            fail(f"capacity {format_gib(mm.capacity)} in the memory map, a {gpu.name} has {format_gib(gpu.memory)}",
                 "the capacity is the GPU's memory", at=f"{gat}.capacity")
        # host categories (compiler/optimize/offload.py): "weights" (all but routed experts), "experts", "kv"
        off_weights = mm.offloaded.get("weights", 0) + mm.offloaded.get("experts", 0)
        if mm.weights + off_weights != b.weights:
            kept = f"{format_gib(mm.weights)} of weights per GPU" + (
                f" (+ {format_gib(off_weights)} offloaded)" if off_weights else "")
            fail(f"{kept}; the memory model gives {format_gib(b.weights)} for {m.name} at {m.weights}, {shape}",
                 "compile the plan again: a rank's weights come from the model's geometry (compiler/model/geometry.py)",
                 at=f"{gat}.weights",
                 notes=(f"plan: {mm.weights + off_weights:,} B, memory model: {b.weights:,} B",))
        block_bytes = b.kv_bytes_per_token * s.block_size
        room = b.usable - mm.weights - b.activations - b.reserve
        limit = max(0, room // block_bytes) if mm.weights + off_weights == b.weights else b.kv_blocks
        limit += mm.offloaded.get("kv", 0) // block_bytes  # blocks kept in host memory
        if mm.kv_blocks < 1:
            fail(f"no KV blocks ({shape})", "the instance cannot serve a request: use a larger tp or pp",
                 at=f"{gat}.kv_blocks")
        elif mm.kv_blocks > limit:
            fail(f"{mm.kv_blocks:,} KV blocks, the memory model fits {limit:,} ({shape}, block_size "
                 f"{s.block_size})", "compile the plan again: the KV cache is sized by the memory model "
                 "(memory_budget in compiler/model/memory.py)",
                 at=f"{gat}.kv_blocks",
                 notes=(f"per GPU: {format_gib(b.usable)} usable - weights {format_gib(mm.weights)} "
                        f"- activations {format_gib(b.activations)} - reserve {format_gib(b.reserve)}, "
                        f"/ {block_bytes:,} B per block",))
        elif mm.kv_cache < mm.kv_blocks * block_bytes:
            fail(f"kv_cache {format_gib(mm.kv_cache)} cannot hold {mm.kv_blocks:,} blocks of {block_bytes:,} B per GPU "
                 f"({format_gib(mm.kv_blocks * block_bytes)})", "give kv_cache the bytes of its blocks",
                 at=f"{gat}.kv_cache")
        if mm.reserve < b.reserve:
            fail(f"reserve {format_gib(mm.reserve)}, the memory model reserves {format_gib(b.reserve)} per GPU",
                 "keep the runtime reserve of compiler/model/memory.py", at=f"{gat}.reserve")
        total = mm.weights + mm.kv_cache + mm.activations + mm.reserve + mm.free
        if total != mm.capacity:
            fail(f"the categories add up to {total:,} B, not the capacity {mm.capacity:,} B",
                 "weights + kv_cache + activations + reserve + free must equal capacity")
        used = total - mm.free
        if used > b.usable:
            fail(f"the engine takes {format_gib(used)} per GPU, more than the usable {format_gib(b.usable)} "
                 f"({GPU_MEMORY_UTILIZATION:.0%} of {format_gib(gpu.memory)})",
                 "shrink the KV cache or the activation arena")
        has_arena = mm.arena_offsets or mm.arena_sizes or v.plan.has("arena_sizes")
        layout = has_arena and layout_problems(m, g.tp, s.max_batched_tokens, s.max_seqs, mm.arena_offsets,
                                               mm.arena_sizes, mm.activations, g.ep)
        if layout:
            fail(f"the activation arena cannot hold one step: {layout[0]}", "compile the plan again: the arena "
                 "is laid out from the step graph (compiler/model/step_graph.py)", at=f"{gat}.arena_offsets",
                 notes=tuple(layout[1:5]))
        longest = longest_request(v.spec.workloads[d.workload], g.role)
        if longest is not None and mm.kv_blocks >= 1 and mm.kv_blocks * s.block_size < longest:
            fail(f"an instance holds {mm.kv_blocks * s.block_size:,} tokens of KV, workload `{d.workload}` "
                 f"sends requests of up to {longest:,}", "use a larger tp or pp, `kv fp8`, or cap the lengths",
                 at=f"{gat}.kv_blocks")
        offloaded = sum(mm.offloaded.values())
        if offloaded > 0:
            if not d.allow_offload:
                fail(f"{format_gib(offloaded)} per GPU offloaded to host memory, but the deployment does not "
                     "`allow offload`", "add `allow offload` to the deployment, or keep everything on the GPU",
                     at=f"{gat}.offloaded")
            for inst in g.instances:
                for ref in inst.gpus:
                    host.setdefault((dep.cluster.name, ref.node), []).append((dp.name, offloaded))


def check_host_memory(v: Verifier, deps: list[DeploymentCheck],
                      host: dict[tuple[str, int], list[tuple[str, int]]]) -> None:
    for (cluster_name, node), uses in sorted(host.items()):
        cluster = v.spec.clusters[cluster_name]
        nodes = cluster_nodes(cluster)
        if not 0 <= node < len(nodes):
            continue  # reported as F0521
        capacity = nodes[node].host_memory or 0
        need = sum(n for _, n in uses)
        if need <= capacity:
            continue
        names = list(dict.fromkeys(name for name, _ in uses))
        v.error("F0524", f"node n{node} of cluster `{cluster_name}`: {format_gib(need)} offloaded to host memory by "
                + ", ".join(f"`{n}`" for n in names) + f", the node has {format_gib(capacity)}",
                "offload less, or declare more `host_memory` for the node", at="deployments")
        for dep in deps:
            if dep.plan.name in names:
                dep.clean = False
