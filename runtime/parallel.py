"""Model parallelism: which slice of the model a rank holds, the collectives between the
tensor-parallel ranks, and a launcher of local gloo process groups (tests, CPU runs).

Tensor parallelism is Megatron style: attention heads and MLP columns split over the TP
ranks (column-parallel in, row-parallel out with an all-reduce), the vocabulary split over
them for the embedding and the LM head. KV heads split too, and are replicated when
tp > kv_heads (`compiler.model.geometry.kv_heads_per_rank`, the plan's arithmetic). Pipeline
parallelism gives each stage a contiguous range of layers.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from flowc.compiler.model.geometry import kv_heads_per_rank

from .config import ModelConfig

__all__ = ["CommTime", "Parallel", "RankLayout", "launch", "free_port"]


@dataclass(frozen=True)
class RankLayout:
    """One rank's slice of each split dimension (ranges of full-model indices).
    `vocab` holds the embedding rows this rank owns; every rank allocates `vocab_padded`
    rows (ceil(vocab / tp), the plan's V), the last rank's tail being padding."""

    heads: range
    kv_heads: range
    ffn: range  # of the dense MLP, or of each expert (expert_ffn) in MoE models
    experts: range  # the experts whose weights this rank holds (all of them at ep 1)
    vocab: range
    vocab_padded: int
    layers: range
    first_stage: bool
    last_stage: bool


@dataclass
class CommTime:
    """Seconds this rank spent in TP collectives and in pipeline sends and receives (with their
    counts), for benchmarks/bench_distributed.py. Gloo's calls return when done, so on CPU this
    is the time they took; NCCL's return once queued, so on GPUs it is the host's share only."""

    collectives: float = 0.0
    collective_calls: int = 0
    pipeline: float = 0.0
    pipeline_calls: int = 0


@dataclass(frozen=True)
class Parallel:
    """This rank's place: `tp_rank` of `tp_size` in the TP `group` (None: the default process
    group), and pipeline stage `pp_rank` of `pp_size`. `ep_size` spreads whole experts over the
    TP ranks (it divides tp_size): rank r holds the experts of share r % ep, each sliced over
    the tp / ep ranks that share them, as geometry.rank_shape counts them."""

    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None
    pp_rank: int = 0
    pp_size: int = 1
    ep_size: int = 1
    comm: CommTime = field(default_factory=CommTime, compare=False)

    def __post_init__(self):
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"rank out of range: tp {self.tp_rank}/{self.tp_size}, pp {self.pp_rank}/{self.pp_size}")
        if self.ep_size < 1 or self.tp_size % self.ep_size:
            raise ValueError(f"ep {self.ep_size} does not divide tp {self.tp_size}")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the TP ranks, in place; returns `t`."""
        if self.tp_size > 1:
            start = time.perf_counter()
            dist.all_reduce(t, group=self.group)
            self._collective(start)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The TP ranks' `t` concatenated along `dim`, in rank order (`t` itself at tp 1)."""
        if self.tp_size == 1:
            return t
        start = time.perf_counter()
        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        self._collective(start)
        return torch.cat(parts, dim=dim)

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Send `t` to global rank `dst` (pipeline stages, point to point)."""
        start = time.perf_counter()
        dist.send(t, dst=dst)
        self._hop(start)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `t` from global rank `src`; returns `t`."""
        start = time.perf_counter()
        dist.recv(t, src=src)
        self._hop(start)
        return t

    def irecv(self, t: torch.Tensor, src: int) -> tuple[Any, torch.Tensor]:
        """Start receiving into `t` from global rank `src`; `wait` it."""
        self.comm.pipeline_calls += 1
        return dist.irecv(t, src=src), t

    def wait(self, received: tuple[Any, torch.Tensor]) -> torch.Tensor:
        """The tensor of an `irecv`, once it arrived (the wait counts as pipeline time)."""
        start = time.perf_counter()
        work, t = received
        work.wait()
        self.comm.pipeline += time.perf_counter() - start
        return t

    def _collective(self, start: float) -> None:
        self.comm.collectives += time.perf_counter() - start
        self.comm.collective_calls += 1

    def _hop(self, start: float) -> None:
        self.comm.pipeline += time.perf_counter() - start
        self.comm.pipeline_calls += 1

    def layout(self, config: ModelConfig) -> RankLayout:
        """This rank's slices of `config`. The degrees split it evenly: `Engine.from_plan` refuses
        a plan whose parallelism the model cannot take (compiler/model/parallelism.py)."""
        tp, r = self.tp_size, self.tp_rank
        ffn = config.expert_ffn if config.is_moe else config.ffn
        h = config.heads // tp
        group = config.heads // config.kv_heads  # query heads per KV head
        # kv_heads_per_rank reads only kv_heads, which ModelConfig shares with spec.Model.
        kv = kv_heads_per_rank(config, tp)  # type: ignore[arg-type]
        kv_start = r * h // group  # the KV head of this rank's first query head
        f, part = ffn // tp, r  # this rank's FFN slice (of each expert): the part-th of width f
        experts = range(config.experts) if config.is_moe else range(0)
        if config.is_moe and self.ep_size > 1:  # whole experts spread, each over tp / ep ranks
            share, n = r % self.ep_size, config.experts // self.ep_size
            experts = range(share * n, (share + 1) * n)
            f, part = ffn * self.ep_size // tp, r // self.ep_size
        vp = -(-config.vocab // tp)
        layers = config.layers
        return RankLayout(
            heads=range(r * h, (r + 1) * h),
            kv_heads=range(kv_start, kv_start + kv),
            ffn=range(part * f, (part + 1) * f),
            experts=experts,
            vocab=range(min(r * vp, config.vocab), min((r + 1) * vp, config.vocab)),
            vocab_padded=vp,
            layers=range(self.pp_rank * layers // self.pp_size, (self.pp_rank + 1) * layers // self.pp_size),
            first_stage=self.pp_rank == 0,
            last_stage=self.pp_rank == self.pp_size - 1,
        )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """Run `fn(Parallel(tp_rank=r, tp_size=world_size), *args)` in `world_size` local processes
    joined in one gloo group (TP over the whole world), and return each rank's result, in rank
    order. `fn` and `args` must be picklable (a module-level function); results go through
    torch.save. A rank that raises makes `launch` raise, and the others are terminated;
    collectives give up after `timeout_s`."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_rank_main, args=(fn, world_size, free_port(), tmp, timeout_s, args),
                                    nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, tmp: str, timeout_s: float,
               args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # The ranks share this host's cores: without a cap each would start one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(Parallel(tp_rank=rank, tp_size=world_size), *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"{rank}.pt"))
