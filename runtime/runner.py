"""Model runners: own the model, the KV pool and the workspace of one instance, and run steps.

`LocalRunner` runs the whole instance in this process (tp = pp = 1). `DistributedRunner` runs
one process per rank of the instance's tp x pp grid over torch.distributed (gloo on CPU, NCCL
on GPUs). Rank r is TP rank r % tp of pipeline stage r // tp (`rank_grid`); each stage's TP
ranks share a process group for their all-reduces. This process is rank 0: it spawns the
others and broadcasts each step's inputs to all of them. Stage s runs its layers and sends the
residual stream to the same TP rank of stage s + 1 (point to point); the last stage's TP rank
0 sends the gathered logits back to rank 0. A step goes through the stages as up to pp
micro-batches of whole sequences (`micro_batches`), so the stages work at once on different
ones; the steps themselves run one after the other (no second step in flight).

Launchers: by default (`launcher="spawn"`) rank 0 spawns the other ranks on this machine. Under
`torchrun` (`launcher="torchrun"`: `flowc launch` writes the command for every node), torchrun
starts every rank, on one node or many, and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT: rank 0 builds the engine and drives the others, which run `serve_rank`.

KV blocks leave and enter an instance through rank 0 (`export_kv`, `import_kv`: disaggregated
serving): every rank's share (its stage's layers, its KV heads) is gathered there, or
scattered from there, as one [ranks, share] tensor.

Faults: a worker that dies, or stops answering for `timeout_s`, makes `run` raise `RankFailure`
(the engine fails its requests with that message); `close` then kills the workers left instead
of waiting for them.

Both build a rank's state the same way (`_RankState`): the model from the plan's model (random
weights from the seed, or a local HF directory), the KV pool with the plan's block count and
size, and the activation workspace at the plan's arena offsets. Step inputs are copied into
the workspace buffers the step graph names (`input_ids`, `positions`, `slot_mapping`,
`logits_indices`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist

from .config import ModelConfig
from .kernels import get_ops
from .model import CausalLM, StepInputs
from .offload import OffloadedWeights
from .parallel import Parallel, free_port
from .weights import load_weights
from .workspace import HeapWorkspace, Workspace

INDEX_INPUTS = ("input_ids", "positions", "slot_mapping", "logits_indices")
Launcher = Literal["spawn", "torchrun"]


@dataclass(frozen=True)
class RunnerSpec:
    """Everything a rank needs to build its share of the instance (picklable)."""

    config: ModelConfig
    tp: int
    weights: Optional[Path]
    dtype: torch.dtype
    kv_dtype: torch.dtype
    device: str
    backend: str
    seed: int
    num_blocks: int
    block_size: int
    arena_offsets: dict[str, int] = field(default_factory=dict)
    arena_sizes: dict[str, int] = field(default_factory=dict)
    pp: int = 1
    ep: int = 1  # whole experts spread over the TP ranks (parallel.Parallel)
    timeout_s: float = 120.0  # a collective that waits longer fails the step (a hung rank)
    launcher: Launcher = "spawn"
    offloaded: dict[str, int] = field(default_factory=dict)  # the memory map's host bytes by category

    @property
    def world(self) -> int:
        return self.tp * self.pp


class RankFailure(RuntimeError):
    """A worker process of the instance died or stopped answering; the message says which."""


def rank_grid(rank: int, tp: int) -> tuple[int, int]:
    """(pipeline stage, TP rank) of global rank `rank` in an instance of TP degree `tp`."""
    return rank // tp, rank % tp


class _RankState:
    def __init__(self, spec: RunnerSpec, parallel: Parallel, rank: int = 0):
        # a node's GPUs are its ranks': all of them here when rank 0 spawned the others
        local = int(os.environ.get("LOCAL_RANK", rank)) if spec.launcher == "torchrun" else rank
        device = torch.device(spec.device if spec.device == "cpu" else f"cuda:{local}")
        self.device, self.rank, self.spec, self.parallel = device, rank, spec, parallel
        c = spec.config
        # with offloaded weights, built on the meta device: each parameter is then allocated where it lives
        offload = any(spec.offloaded.values())
        self.model = CausalLM(c, get_ops(spec.backend, str(device)), parallel, spec.dtype,
                              torch.device("meta") if offload else device)
        self.offloaded = OffloadedWeights(self.model, spec.offloaded, device) if offload else None
        if spec.weights is not None:
            load_weights(self.model, spec.weights)
        else:
            self.model.init_random(spec.seed)
        if self.offloaded is not None:
            self.offloaded.install()
        self.kv = self.model.make_kv_cache(spec.num_blocks, spec.block_size, spec.kv_dtype)
        if spec.arena_offsets:
            self.workspace = Workspace(spec.arena_offsets, spec.arena_sizes, spec.dtype, device)
        else:
            self.workspace = HeapWorkspace(device)

    def run(self, inputs: dict[str, list]) -> Optional[torch.Tensor]:
        """This rank's part of one step: rank 0 returns the logits, the others None. With pp > 1
        the step goes through the stages in micro-batches (`micro_batches`), so stage s works on
        one while stage s + 1 works on the one before."""
        spec, par = self.spec, self.parallel
        if par.pp_size == 1:
            return self._forward(inputs, None)
        parts = micro_batches(inputs, par.pp_size)
        sampled = [len(part["logits_indices"]) for part in parts]  # a part that samples nothing sends nothing
        pending = []
        if self.rank == 0:  # posted first: the last stage's sends must not wait for this rank
            pending = [par.irecv(torch.empty(rows, spec.config.vocab, dtype=torch.float32, device=self.device),
                                 src=spec.world - spec.tp) for rows in sampled if rows]
        for part, rows in zip(parts, sampled):
            hidden = None
            if par.pp_rank > 0:  # the previous stage's residual stream, into this stage's residual buffer
                hidden = self.workspace.buffer("residual", (len(part["input_ids"]), spec.config.hidden), spec.dtype)
                par.recv(hidden, src=self.rank - spec.tp)
            out = self._forward(part, hidden)
            if par.pp_rank < par.pp_size - 1:
                par.send(out, dst=self.rank + spec.tp)
            elif par.tp_rank == 0 and rows:  # the last stage's logits, gathered over its TP ranks
                par.send(out.contiguous(), dst=0)
        if self.rank != 0:
            return None
        logits = [par.wait(received) for received in pending]
        return torch.cat(logits) if logits else torch.empty(0, spec.config.vocab, device=self.device)

    def kv_share_numel(self, blocks: int) -> int:
        """Elements of a rank's share of `blocks` KV blocks, at the largest pipeline stage's layers
        (stages differ by one layer at most); every rank holds the same KV heads per layer."""
        _, _, _, block_size, heads, head_dim = self.kv.pool.shape
        return 2 * -(-self.spec.config.layers // self.spec.pp) * blocks * block_size * heads * head_dim

    def kv_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """This rank's share of blocks `block_ids` (the layers of its stage, its KV heads),
        flattened and padded to `kv_share_numel` (the ranks' shares then stack)."""
        pool = self.kv.pool
        share = pool[:, :, torch.tensor(block_ids, dtype=torch.long, device=pool.device)].reshape(-1)
        padded = torch.zeros(self.kv_share_numel(len(block_ids)), dtype=pool.dtype, device=pool.device)
        padded[:share.numel()] = share
        return padded

    def set_kv_blocks(self, block_ids: list[int], share: torch.Tensor) -> None:
        """Write this rank's share of blocks `block_ids`, as `kv_blocks` gives it."""
        pool = self.kv.pool
        index = torch.tensor(block_ids, dtype=torch.long, device=pool.device)
        shape = (2, pool.shape[1], len(block_ids), *pool.shape[3:])
        pool[:, :, index] = share[:math.prod(shape)].to(pool.device).view(shape)

    def _forward(self, inputs: dict[str, list], hidden: Optional[torch.Tensor]) -> torch.Tensor:
        tensors = {}
        for name in INDEX_INPUTS:
            values = torch.tensor(inputs[name], dtype=torch.int64)
            buffer = self.workspace.buffer(name, tuple(values.shape), torch.int64)
            buffer.copy_(values)
            tensors[name] = buffer
        width = max(len(t) for t in inputs["block_tables"])
        padded = [table + [0] * (width - len(table)) for table in inputs["block_tables"]]  # past seq_lens: unread
        step = StepInputs(block_tables=torch.tensor(padded, dtype=torch.int32, device=self.device),
                          seq_lens=torch.tensor(inputs["seq_lens"], dtype=torch.int32, device=self.device),
                          query_start_loc=torch.tensor(inputs["query_start_loc"], dtype=torch.int32,
                                                       device=self.device), **tensors)
        with torch.inference_mode():
            return self.model(step, self.kv, self.workspace, hidden)


def micro_batches(inputs: dict[str, list], n: int) -> list[dict[str, list]]:
    """A step's inputs split into at most `n` micro-batches of whole sequences (fewer when it has
    fewer sequences), balanced by tokens; their logits rows, concatenated, are the step's."""
    starts, rows = inputs["query_start_loc"], inputs["logits_indices"]
    seqs, tokens = len(starts) - 1, starts[-1]
    # sequence boundaries nearest to equal shares of the tokens, each micro-batch non-empty
    cuts = sorted({0, seqs} | {min(range(1, seqs), key=lambda s: abs(starts[s] - tokens * k / n))
                               for k in range(1, min(n, seqs))})
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        lo, hi = starts[a], starts[b]
        parts.append({
            "input_ids": inputs["input_ids"][lo:hi], "positions": inputs["positions"][lo:hi],
            "slot_mapping": inputs["slot_mapping"][lo:hi], "block_tables": inputs["block_tables"][a:b],
            "seq_lens": inputs["seq_lens"][a:b], "query_start_loc": [q - lo for q in starts[a:b + 1]],
            "logits_indices": [r - lo for r in rows if lo <= r < hi]})
    return parts


class LocalRunner:
    def __init__(self, spec: RunnerSpec):
        self.state = _RankState(spec, Parallel())

    def run(self, inputs: dict[str, list]) -> torch.Tensor:
        out = self.state.run(inputs)
        assert out is not None  # rank 0 of one rank
        return out

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """Blocks `block_ids` of every rank's pool: [ranks, share] (`_RankState.kv_blocks`)."""
        return self.state.kv_blocks(block_ids).unsqueeze(0)

    def import_kv(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write what `export_kv` of an instance of the same layout gave into blocks `block_ids`."""
        self.state.set_kv_blocks(block_ids, blocks[0])

    def close(self):
        pass


def _backend(spec: RunnerSpec) -> str:
    return "gloo" if spec.device == "cpu" else "nccl"


def _join(spec: RunnerSpec, rank: int) -> _RankState:
    """Join the instance's process group as `rank` and build that rank's share. Every rank
    creates every stage's TP group, in stage order, as torch.distributed requires."""
    dist.init_process_group(_backend(spec), rank=rank, world_size=spec.world,
                            timeout=timedelta(seconds=spec.timeout_s))
    stage, tp_rank = rank_grid(rank, spec.tp)
    groups = [dist.new_group(list(range(s * spec.tp, (s + 1) * spec.tp))) if spec.pp > 1 else None
              for s in range(spec.pp)]
    parallel = Parallel(tp_rank=tp_rank, tp_size=spec.tp, group=groups[stage], pp_rank=stage, pp_size=spec.pp,
                        ep_size=spec.ep)
    return _RankState(spec, parallel, rank)


def _serve(state: _RankState) -> None:
    """A rank other than 0: run every step rank 0 broadcasts, and its KV exports and imports
    (`DistributedRunner.export_kv`), until it sends None."""
    try:
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                return
            if isinstance(message[0], tuple):  # ("export" | "import", block ids)
                _move_kv(state, *message[0])
            else:
                state.run(message[0])
    finally:
        dist.destroy_process_group()


def _move_kv(state: _RankState, what: str, block_ids: list[int],
             blocks: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Every rank's share of KV blocks `block_ids` to rank 0 ("export", gathered there as
    [ranks, share]), or from rank 0 back into the ranks' pools ("import", `blocks` on rank 0)."""
    if what == "export":
        share = state.kv_blocks(block_ids)
        gathered = [torch.empty_like(share) for _ in range(state.spec.world)] if state.rank == 0 else None
        dist.gather(share, gathered, dst=0)
        return torch.stack(gathered) if gathered is not None else None
    share = torch.empty(state.kv_share_numel(len(block_ids)), dtype=state.kv.pool.dtype, device=state.device)
    dist.scatter(share, list(blocks.to(state.device).unbind(0)) if blocks is not None else None, src=0)
    state.set_kv_blocks(block_ids, share)
    return None


def _worker(index: int, spec: RunnerSpec, port: int):
    """Rank index + 1, spawned by rank 0: build its shard and serve."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if spec.device == "cpu":  # the ranks share this host's cores: one thread pool each would oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    _serve(_join(spec, index + 1))


def torchrun_rank(spec: RunnerSpec) -> int:
    """This process's rank in a torchrun-started instance; RuntimeError unless torchrun started
    it with the instance's world size."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError) as error:
        raise RuntimeError("launcher torchrun, but RANK and WORLD_SIZE are not set: start it with torchrun "
                           "(`flowc launch` writes the command)") from error
    if world != spec.world:
        raise RuntimeError(f"torchrun started {world} processes and the instance has {spec.world} ranks "
                           f"(tp {spec.tp} x pp {spec.pp}): use the command `flowc launch` writes")
    return rank


def serve_rank(spec: RunnerSpec) -> None:
    """Rank > 0 of a torchrun-started instance: build this rank's shard, then run the steps rank
    0 sends until it closes the engine."""
    _serve(_join(spec, torchrun_rank(spec)))


class DistributedRunner:
    def __init__(self, spec: RunnerSpec):
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine is already running in this process; close it first")
        self.workers = None  # torchrun started the other ranks, wherever they run
        if spec.launcher == "torchrun":
            if torchrun_rank(spec) != 0:
                raise RuntimeError("rank 0 builds the engine; the other ranks run `serve_rank`")
        else:
            port = free_port()
            self.workers = mp.start_processes(_worker, args=(spec, port), nprocs=spec.world - 1, join=False,
                                              start_method="spawn")
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        self.state = _join(spec, 0)
        self.failed = False

    def _dead(self) -> str | None:
        """Which worker exited, if one did (known for the workers this process spawned)."""
        for index, process in enumerate(self.workers.processes if self.workers else ()):
            if not process.is_alive():
                return f"rank {index + 1} of the instance exited (exit code {process.exitcode})"
        return None

    def run(self, inputs: dict[str, list]) -> torch.Tensor:
        dead = self._dead()
        if dead is not None:
            self.failed = True
            raise RankFailure(dead)
        try:
            dist.broadcast_object_list([inputs], src=0)
            out = self.state.run(inputs)
        except RuntimeError as error:  # gloo / NCCL: a peer closed its connection, or a timeout
            self.failed = True
            raise RankFailure(self._dead() or f"a rank of the instance stopped answering ({error})") from error
        assert out is not None  # rank 0 receives the logits
        return out

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """Blocks `block_ids` of every rank's pool, gathered here: [ranks, share]."""
        dist.broadcast_object_list([("export", block_ids)], src=0)
        out = _move_kv(self.state, "export", block_ids)
        assert out is not None  # rank 0 gathers
        return out

    def import_kv(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Scatter `blocks` ([ranks, share], from `export_kv` of an instance of the same layout)
        into blocks `block_ids` of the ranks' pools."""
        dist.broadcast_object_list([("import", block_ids)], src=0)
        _move_kv(self.state, "import", block_ids, blocks)

    def close(self):
        if not dist.is_initialized():
            return
        if self.failed:  # the workers left cannot take part in a collective: stop them
            for process in self.workers.processes if self.workers else ():  # (torchrun stops its own)
                process.kill()
                process.join(timeout=10)
        else:
            dist.broadcast_object_list([None], src=0)
            if self.workers:
                self.workers.join()
        dist.destroy_process_group()


def make_runner(spec: RunnerSpec):
    return LocalRunner(spec) if spec.world == 1 else DistributedRunner(spec)
