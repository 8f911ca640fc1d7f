"""Disaggregated serving: prefill instances compute prompts, decode instances the rest.

`DisaggregatedEngine.from_plan(plan)` (or `open_plan`, which picks the engine a plan needs)
builds one `Engine` per instance of the deployment's prefill and decode groups, all in this
process, and serves requests through the same API as `Engine` (docs/runtime.md). A request:

  1. goes to a prefill instance (round robin), which computes its prompt and samples its first
     token (its TTFT), then parks it, holding its KV blocks (PREFILLED);
  2. when a decode instance has room (a sequence slot and the blocks of the prompt, and no
     preempted sequence of its own waiting), that instance reserves the blocks (RECEIVING) and
     the prompt's KV (every layer, whole blocks) moves through the `KVTransport`. A request for
     which no decode instance has room waits, first come first served, and its prefill
     instance keeps its blocks: nothing is dropped;
  3. the decode instance writes the KV into its blocks and acknowledges; the request runs
     there from its next step, decoding (preempted there, it is recomputed there);
  4. on the acknowledgement, the prefill instance frees its blocks (full ones stay in its
     prefix cache).

A request that finishes with its first token (max_tokens 1, or a stop token) never moves.
Aborting a request frees its blocks wherever it is, on both sides while its KV moves.

Before any transfer the KV layouts must agree (`check_layouts`): the model, the layers and KV
heads each pool holds, head_dim, the KV dtype and the block size (the block counts may differ).

Every instance runs in this process with tp = pp = 1: a step of each instance runs in turn (a
`poll` steps every instance once), and the KV moves between pools in memory
(`InProcessTransport`). `TorchDistributedTransport` moves it between processes (gloo or NCCL
send/recv); not built yet: an engine that runs each instance in a process of its own over it,
and with it instances of tp or pp above 1, whose KV is spread over processes.
"""

from __future__ import annotations

import itertools
import pickle
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from flowc.compiler.model.geometry import kv_heads_per_rank
from flowc.compiler.plan import DeploymentPlan, Plan

from .engine import DTYPES, Engine, EngineError, Request, RequestOutput, ServingAPI, TokenEvent, _deployment, load_plan
from .kv_cache import KVCache
from .replicas import ReplicatedEngine
from .runner import LocalRunner
from .sequence import RequestError, Sequence

# ---------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class KVLayout:
    """What a KV block of an instance's pool holds, and how many blocks it has."""

    model: str
    layers: int  # the layers this pool holds
    kv_heads: int  # per rank
    head_dim: int
    dtype: str  # a key of engine.DTYPES
    block_size: int
    num_blocks: int  # may differ between producer and consumer


def kv_layout(engine: Engine) -> KVLayout:
    """The layout of `engine`'s KV pool (an instance that runs in this process)."""
    pool = _pool(engine)
    m, group = engine.plan.model_spec, engine.group
    dtype = next(name for name, d in DTYPES.items() if d == pool.pool.dtype)
    return KVLayout(model=engine.plan.model, layers=pool.layers, kv_heads=kv_heads_per_rank(m, group.tp),
                    head_dim=m.head_dim, dtype=dtype, block_size=pool.block_size, num_blocks=pool.num_blocks)


def check_layouts(producer: KVLayout, consumer: KVLayout, what: str = "the prefill and decode instances") -> None:
    """EngineError unless KV blocks of `producer` can be copied as they are into `consumer`."""
    differences = [f"{f.name} {getattr(producer, f.name)} vs {getattr(consumer, f.name)}" for f in fields(KVLayout)
                   if f.name != "num_blocks" and getattr(producer, f.name) != getattr(consumer, f.name)]
    if differences:
        raise EngineError(f"the KV caches of {what} differ ({'; '.join(differences)}, prefill vs decode), so KV "
                          "blocks cannot move between them: give both roles the same model, KV dtype (and "
                          "--dtype) and block_size, and TP degrees that hold the same KV heads per rank")


def _pool(engine: Engine) -> KVCache:
    if not isinstance(engine.runner, LocalRunner):  # a tp or pp > 1 pool is spread over processes
        raise EngineError("disaggregated serving moves KV within this process and needs instances of tp 1, pp 1")
    return engine.runner.state.kv


def export_blocks(engine: Engine, block_ids: list[int]) -> torch.Tensor:
    """A copy of blocks `block_ids` of every layer: [2 (k, v), layers, blocks, block_size, heads, head_dim]."""
    pool = _pool(engine).pool
    return pool[:, :, torch.tensor(block_ids, dtype=torch.long, device=pool.device)]


def import_blocks(engine: Engine, block_ids: list[int], blocks: torch.Tensor) -> None:
    """Write `blocks` (as `export_blocks` gives them) into blocks `block_ids` of `engine`'s pool."""
    pool = _pool(engine).pool
    pool[:, :, torch.tensor(block_ids, dtype=torch.long, device=pool.device)] = blocks.to(pool.device)


# -------------------------------------------------------------------------------- transport


@dataclass(frozen=True)
class KVTransfer:
    """The header of one request's KV on its way from a prefill instance (`producer`, its index
    among the prefill instances) to a decode instance (`consumer`): the blocks it leaves from,
    the blocks reserved for it, the tokens they hold and the producer's layout."""

    request_id: str
    producer: int
    consumer: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    num_tokens: int
    layout: KVLayout


class KVTransport(ABC):
    """Moves KV blocks from producers to consumers, and acknowledgements back.

    The protocol: the producer `send`s a transfer with its blocks and keeps them; the consumer
    `recv`s it, writes the blocks into the ones it reserved and `ack`s; the producer frees its
    blocks when `acks` gives it the transfer. `cancel` forgets a request's transfer wherever it
    is (aborted). Nothing blocks: `recv` and `acks` return what has arrived, perhaps nothing.

    `InProcessTransport` moves them within this process, `TorchDistributedTransport` between
    the processes of a torch.distributed group.
    """

    @abstractmethod
    def send(self, transfer: KVTransfer, blocks: torch.Tensor) -> None:
        """Producer: start moving `blocks` (`export_blocks`) for `transfer`."""

    @abstractmethod
    def recv(self, consumer: int) -> list[tuple[KVTransfer, torch.Tensor]]:
        """Consumer `consumer`: the transfers that arrived for it since the last call."""

    @abstractmethod
    def ack(self, transfer: KVTransfer) -> None:
        """Consumer: the KV of `transfer` is in its blocks; the producer may free its own."""

    @abstractmethod
    def acks(self, producer: int) -> list[KVTransfer]:
        """Producer `producer`: its transfers acknowledged since the last call."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget the transfer of `request_id`, delivered or not, and its acknowledgement."""

    @abstractmethod
    def close(self) -> None:
        """Release what the transport holds."""


class InProcessTransport(KVTransport):
    """Queues in this process: a transfer arrives at the consumer's next `recv`."""

    def __init__(self):
        self._inbox: dict[int, deque[tuple[KVTransfer, torch.Tensor]]] = {}
        self._acked: dict[int, deque[KVTransfer]] = {}

    def send(self, transfer: KVTransfer, blocks: torch.Tensor) -> None:
        self._inbox.setdefault(transfer.consumer, deque()).append((transfer, blocks))

    def recv(self, consumer: int) -> list[tuple[KVTransfer, torch.Tensor]]:
        inbox = self._inbox.pop(consumer, deque())
        return list(inbox)

    def ack(self, transfer: KVTransfer) -> None:
        self._acked.setdefault(transfer.producer, deque()).append(transfer)

    def acks(self, producer: int) -> list[KVTransfer]:
        return list(self._acked.pop(producer, deque()))

    def cancel(self, request_id: str) -> None:
        for inbox in self._inbox.values():
            kept = [item for item in inbox if item[0].request_id != request_id]
            inbox.clear()
            inbox.extend(kept)
        for acked in self._acked.values():
            kept_acks = [t for t in acked if t.request_id != request_id]
            acked.clear()
            acked.extend(kept_acks)

    def close(self) -> None:
        self._inbox.clear()
        self._acked.clear()


class TorchDistributedTransport(KVTransport):
    """KV between processes of one torch.distributed process group (gloo on CPU, NCCL on GPUs).

    `producers` and `consumers` map each prefill and decode instance index to the rank of the
    process that holds its pool; `rank` is this process's. A transfer goes to the consumer's
    rank as messages on one ordered channel (tag): the header's length, the header (the pickled
    `KVTransfer` with the blocks' shape and dtype) and the blocks; an acknowledgement goes back
    on the other tag as length and header. A receiving thread per peer and channel blocks on its
    next message and queues it, so `recv` and `acks` never wait (gloo's posted receives do not
    report completion before they are waited on). A cancelled request's transfer or
    acknowledgement is dropped when it arrives. `close` sends every peer a zero length, which
    ends its receiving thread. The caller owns the process group. Headers are pickled, as
    torch.distributed's object collectives are: the ranks of one group trust each other.
    """

    _TRANSFER, _ACK = 1, 2  # tags: the two directions between a pair of ranks never share a channel

    def __init__(self, rank: int, producers: dict[int, int], consumers: dict[int, int],
                 group: Optional[dist.ProcessGroup] = None, device: str = "cpu", timeout_s: float = 60.0):
        self.rank, self.producers, self.consumers, self.group = rank, producers, consumers, group
        self.device, self.timeout_s = torch.device(device), timeout_s
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []  # sends in flight, with their buffers
        self._arrivals: queue.Queue = queue.Queue()  # (tag, transfer, blocks or None) from the threads
        self._inbox: dict[int, list[tuple[KVTransfer, torch.Tensor]]] = {}
        self._acked: dict[int, list[KVTransfer]] = {}
        self._cancelled: set[str] = set()
        # who sends here on which channel: producers to a consumer here, consumers' acks to a producer here
        incoming = [(peer, self._TRANSFER) for peer in set(producers.values()) - {rank} if rank in consumers.values()]
        incoming += [(peer, self._ACK) for peer in set(consumers.values()) - {rank} if rank in producers.values()]
        self._threads = [threading.Thread(target=self._listen, args=(peer, tag), daemon=True,
                                          name=f"kv-{'transfers' if tag == self._TRANSFER else 'acks'}-from-{peer}")
                         for peer, tag in incoming]
        for thread in self._threads:
            thread.start()

    def _listen(self, peer: int, tag: int) -> None:
        """Receive `peer`'s messages on `tag` until it sends a zero length (closed)."""
        while True:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.recv(length, src=peer, group=self.group, tag=tag)
            if int(length.item()) == 0:
                return
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
            dist.recv(data, src=peer, group=self.group, tag=tag)
            header = pickle.loads(data.cpu().numpy().tobytes())
            if tag == self._ACK:
                self._arrivals.put((tag, header, None))
                continue
            transfer, shape, dtype = header
            blocks = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=self.device)
            dist.recv(blocks, src=peer, group=self.group, tag=tag)
            self._arrivals.put((tag, transfer, blocks))

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._sending.append((dist.isend(tensor, dst=dst, group=self.group, tag=tag), tensor))
        self._sending = [(w, t) for w, t in self._sending if not w.is_completed()]

    def _send_header(self, header: object, dst: int, tag: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8).to(self.device)
        self._isend(torch.tensor([data.numel()], dtype=torch.int64, device=self.device), dst, tag)
        self._isend(data, dst, tag)

    def _drain(self) -> None:
        """Sort what the threads received into the inboxes and acknowledgements."""
        while True:
            try:
                tag, transfer, blocks = self._arrivals.get_nowait()
            except queue.Empty:
                return
            if transfer.request_id in self._cancelled:
                continue
            if tag == self._ACK:
                self._acked.setdefault(transfer.producer, []).append(transfer)
            else:
                self._inbox.setdefault(transfer.consumer, []).append((transfer, blocks))

    def send(self, transfer: KVTransfer, blocks: torch.Tensor) -> None:
        blocks = blocks.contiguous()
        dst = self.consumers[transfer.consumer]
        self._send_header((transfer, tuple(blocks.shape), str(blocks.dtype)), dst, self._TRANSFER)
        self._isend(blocks, dst, self._TRANSFER)

    def recv(self, consumer: int) -> list[tuple[KVTransfer, torch.Tensor]]:
        self._drain()
        return self._inbox.pop(consumer, [])

    def ack(self, transfer: KVTransfer) -> None:
        self._send_header(transfer, self.producers[transfer.producer], self._ACK)

    def acks(self, producer: int) -> list[KVTransfer]:
        self._drain()
        return self._acked.pop(producer, [])

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        for inbox in self._inbox.values():
            inbox[:] = [(t, blocks) for t, blocks in inbox if t.request_id != request_id]
        for acked in self._acked.values():
            acked[:] = [t for t in acked if t.request_id != request_id]

    def close(self) -> None:
        """Tell every peer this side is done (a zero length on each channel it sends on), wait for
        the sends in flight, and for the peers' goodbyes (at most `timeout_s`)."""
        outgoing = [(peer, self._TRANSFER) for peer in set(self.consumers.values()) - {self.rank}
                    if self.rank in self.producers.values()]
        outgoing += [(peer, self._ACK) for peer in set(self.producers.values()) - {self.rank}
                     if self.rank in self.consumers.values()]
        for peer, tag in outgoing:
            self._isend(torch.zeros(1, dtype=torch.int64, device=self.device), peer, tag)
        for work, _ in self._sending:
            work.wait()
        self._sending.clear()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s)
        self._inbox.clear()
        self._acked.clear()


# ------------------------------------------------------------------------------------ engine


def _disaggregated(dp: DeploymentPlan) -> bool:
    return any(g.role != "colocated" for g in dp.groups)


def open_plan(plan: Plan | str | Path, weights: str | Path | None = None, *, deployment: Optional[str] = None,
              **options) -> "ServingAPI":
    """The engine that runs `plan`'s deployment: a `DisaggregatedEngine` for prefill and decode
    instances, a `ReplicatedEngine` for several colocated instances of tp = pp = 1, else an
    `Engine` for its (first) colocated instance (`Engine.from_plan`'s arguments)."""
    p = load_plan(plan)
    dp = _deployment(p, deployment)
    if _disaggregated(dp):
        return DisaggregatedEngine.from_plan(p, weights, deployment=dp.name, **options)
    if len(dp.instance_labels()) > 1 and all(g.tp * g.pp == 1 for g in dp.groups) and not options.get("launcher"):
        return ReplicatedEngine.from_plan(p, weights, deployment=dp.name, **options)
    return Engine.from_plan(p, weights, deployment=dp.name, **options)


@dataclass
class _Route:
    """Where a request in flight is: its prefill instance, then its decode instance."""

    prefill: Engine
    decode: Optional[Engine] = None


class DisaggregatedEngine(ServingAPI):
    """Prefill and decode instances of one plan behind one `Engine` API (module docstring).

    `prefill` and `decode` hold the instances' engines; `transport` moves the KV. Not
    thread-safe: one loop drives it, and a `poll` steps every instance once.
    """

    def __init__(self, plan: Plan, dp: DeploymentPlan, prefill: list[Engine], decode: list[Engine],
                 transport: Optional[KVTransport] = None):
        if not prefill or not decode:
            raise EngineError(f"deployment `{dp.name}` needs prefill and decode instances, and has "
                              f"{len(prefill)} and {len(decode)}")
        self.plan_document, self.plan = plan, dp
        self.prefill, self.decode = prefill, decode
        self.config = prefill[0].config
        self.transport = transport if transport is not None else InProcessTransport()
        self.layouts = [kv_layout(e) for e in prefill], [kv_layout(e) for e in decode]
        for i, producer in enumerate(self.layouts[0]):
            for j, consumer in enumerate(self.layouts[1]):
                check_layouts(producer, consumer, f"prefill instance {i} and decode instance {j}")
        self._ids = itertools.count()
        self._live: dict[str, RequestOutput] = {}
        self._events: list[TokenEvent] = []
        self._routes: dict[str, _Route] = {}
        self._handoffs: deque[tuple[int, Sequence]] = deque()  # (prefill instance, PREFILLED), oldest first
        self._unacked: dict[str, int] = {}  # request id -> the prefill instance holding its blocks
        self._next_prefill = self._next_decode = 0
        # KV moved so far, and the seconds spent exporting, sending and importing it
        # (benchmarks/bench_distributed.py)
        self.kv_transfers, self.kv_bytes, self.kv_seconds = 0, 0, 0.0
        self._clock_start = time.perf_counter()
        for engine in prefill + decode:  # one clock: a request's times come from two instances
            engine._clock_start = self._clock_start

    @classmethod
    def from_plan(cls, plan: Plan | str | Path, weights: str | Path | None = None, *,
                  deployment: Optional[str] = None, dtype: Optional[str] = None, backend: str = "auto",
                  seed: int = 0, transport: Optional[KVTransport] = None) -> "DisaggregatedEngine":
        """The engines of every instance of `plan`'s prefill and decode groups (`Engine.from_plan`'s
        arguments; random weights are the same on every instance), joined by `transport`
        (default: `InProcessTransport`)."""
        p = load_plan(plan)
        dp = _deployment(p, deployment)
        if not _disaggregated(dp):
            raise EngineError(f"deployment `{dp.name}` is colocated: run it with `Engine.from_plan` (or `open_plan`)")
        roles = {g.role for g in dp.groups}
        if roles != {"prefill", "decode"}:
            raise EngineError(f"deployment `{dp.name}` has {', '.join(sorted(roles))} instances; disaggregated "
                              "serving runs prefill and decode instances only")
        for g in dp.groups:
            if g.tp * g.pp > 1:
                raise EngineError(f"deployment `{dp.name}` runs {g.role} instances of tp {g.tp} x pp {g.pp}; "
                                  "disaggregated serving moves KV within this process for now and runs tp 1, pp 1 "
                                  "instances only: restrict the spec with `tp in [1]` and `pp in [1]`")
        engines: dict[str, list[Engine]] = {"prefill": [], "decode": []}
        try:
            for g in dp.groups:
                for _ in g.instances:
                    engines[g.role].append(Engine.for_group(p, dp, g, weights, dtype=dtype, backend=backend,
                                                            seed=seed))
            return cls(p, dp, engines["prefill"], engines["decode"], transport)
        except BaseException:
            for engine in engines["prefill"] + engines["decode"]:
                engine.close()
            raise

    # ------------------------------------------------------------------ requests

    def _validate(self, request: Request) -> None:
        """RequestError unless `request` can run on every instance the router may pick: all of
        it on a decode instance (Engine's checks), its prompt on a prefill instance."""
        for engine in self.decode:
            engine._validate(request)
        prompt = request.prompt_token_ids
        for engine in self.prefill:
            problem = engine.scheduler.unservable(len(prompt), prompt_only=True)
            if problem:
                raise RequestError(f"a prompt of {len(prompt)} tokens cannot run on the prefill instances: "
                                   f"{problem}; shorten the prompt")

    def _queue(self, request: Request, request_id: str, arrival_time: float) -> RequestOutput:
        # a prefill instance still holding the id's blocks (unacknowledged) would refuse it
        if request_id in self._live or request_id in self._unacked:
            raise RequestError(f"duplicate request id {request_id!r}: a request with this id is in flight")
        k = self._next_prefill % len(self.prefill)
        engine = self.prefill[k]
        self._next_prefill += 1
        output = engine._queue(request, request_id, arrival_time, handoff=True)
        output.instances = (f"prefill {k}",)
        self._live[request_id] = output
        self._routes[request_id] = _Route(engine)
        return output

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        output = self._live.pop(request_id, None)
        if output is None:
            return None
        route = self._routes.pop(request_id)
        if route.decode is None:  # waiting, running or PREFILLED on its prefill instance
            self._handoffs = deque(h for h in self._handoffs if h[1].request_id != request_id)
            route.prefill._abort(request_id)
        else:  # RECEIVING or running on its decode instance
            route.decode._abort(request_id)
        producer = self._unacked.pop(request_id, None)
        if producer is not None:  # its KV was on its way: both sides let go
            self.transport.cancel(request_id)
            self.prefill[producer].scheduler.release(request_id)
        return output

    def now(self) -> float:
        return time.perf_counter() - self._clock_start

    # ------------------------------------------------------------------ stepping

    @property
    def num_waiting_for_decode(self) -> int:
        """Prefilled requests waiting for room on a decode instance (their prefill instances hold their KV)."""
        return len(self._handoffs)

    def has_work(self) -> bool:
        """Whether a request is in flight (on an instance, or its KV on its way) or a final event
        is still to be given."""
        return bool(self._events) or any(e.has_work() for e in self.prefill + self.decode)

    def poll(self) -> list[TokenEvent]:
        """One step of every prefill instance, the KV moves that can start and end, then one step
        of every decode instance; the events since the last call (as `Engine.poll`, instance by
        instance: a request's first token comes from its prefill instance)."""
        events, self._events = self._events, []
        for i, engine in enumerate(self.prefill):
            events += engine.poll()
            self._handoffs.extend((i, seq) for seq in engine.scheduler.take_prefilled())
        self._send()
        self._receive()
        self._settle()
        for engine in self.decode:
            events += engine.poll()
        for event in events:  # a request leaves when its output is complete
            output = self._live.get(event.request_id)
            if event.finish_reason is not None and output is not None and output.finish_reason is not None:
                del self._live[event.request_id]
                del self._routes[event.request_id]
        return events

    def _send(self) -> None:
        """Start moving the KV of prefilled requests, first come first served, each to the next
        decode instance (round robin) with room; the first that finds none waits, and so do
        those behind it."""
        while self._handoffs:
            i, seq = self._handoffs[0]
            tokens = seq.num_tokens - 1  # the prompt: the first token's KV is the decode's first step
            for k in range(len(self.decode)):
                j = (self._next_decode + k) % len(self.decode)
                if self.decode[j].scheduler.can_receive(tokens):
                    break
            else:
                return
            self._handoffs.popleft()
            self._next_decode = j + 1
            producer, consumer = self.prefill[i], self.decode[j]
            output = producer.hand_off(seq.request_id)
            output.instances += (f"decode {j}",)
            received = consumer.take_over(seq, output)
            self._routes[seq.request_id].decode = consumer
            src = seq.block_ids[:len(received.block_ids)]
            transfer = KVTransfer(seq.request_id, i, j, tuple(src), tuple(received.block_ids), tokens,
                                  self.layouts[0][i])
            self._unacked[seq.request_id] = i
            start = time.perf_counter()
            blocks = export_blocks(producer, src)
            self.transport.send(transfer, blocks)
            self.kv_seconds += time.perf_counter() - start
            self.kv_transfers += 1
            self.kv_bytes += blocks.numel() * blocks.element_size()

    def _receive(self) -> None:
        """Write the KV that arrived into the blocks each decode instance reserved; acknowledge."""
        for j, engine in enumerate(self.decode):
            for transfer, blocks in self.transport.recv(j):
                if self._unacked.get(transfer.request_id) != transfer.producer:
                    continue  # aborted on its way (a transport that cancels late)
                check_layouts(transfer.layout, self.layouts[1][j], f"prefill instance {transfer.producer} and "
                              f"decode instance {j}")
                start = time.perf_counter()
                import_blocks(engine, list(transfer.dst_blocks), blocks)
                self.kv_seconds += time.perf_counter() - start
                engine.scheduler.arrived(transfer.request_id)
                self.transport.ack(transfer)

    def _settle(self) -> None:
        """Free the prefill instances' blocks of acknowledged transfers."""
        for i, engine in enumerate(self.prefill):
            for transfer in self.transport.acks(i):
                if self._unacked.get(transfer.request_id) == i:
                    del self._unacked[transfer.request_id]
                    engine.scheduler.release(transfer.request_id)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        for engine in self.prefill + self.decode:
            engine.close()
        self.transport.close()
