"""Moving KV blocks between instances: the layout check, the blocks' export and import, the
`KVTransport` interface with its two implementations, and the three steps of a move that a
prefill or decode instance runs on its own pool (`send_kv`, `receive_kv`, `settle_kv`), in
this process (`DisaggregatedEngine` with in-process instances) or in an instance's own process
(runtime/instance_process.py). docs/runtime.md, "Disaggregated serving", has the protocol.
"""

from __future__ import annotations

import pickle
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist

from flowc.compiler.model.geometry import kv_heads_per_rank

from .engine import DTYPES, Engine, EngineError
from .sequence import SequenceStatus

# ---------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class KVLayout:
    """What the KV blocks of an instance hold, spread over its ranks, and how many it has."""

    model: str
    layers: int  # all the instance's layers (stage s of pp holds layers * s // pp to layers * (s + 1) // pp)
    tp: int
    pp: int
    kv_heads: int  # per rank
    head_dim: int
    dtype: str  # a key of engine.DTYPES
    block_size: int
    num_blocks: int  # may differ between producer and consumer


def kv_layout(engine: Engine) -> KVLayout:
    """The layout of `engine`'s KV pools (rank 0's runs in this process)."""
    kv = engine.runner.state.kv
    m, group = engine.plan.model_spec, engine.group
    dtype = next(name for name, d in DTYPES.items() if d == kv.pool.dtype)
    return KVLayout(model=engine.plan.model, layers=engine.config.layers, tp=group.tp, pp=group.pp,
                    kv_heads=kv_heads_per_rank(m, group.tp), head_dim=m.head_dim, dtype=dtype,
                    block_size=kv.block_size, num_blocks=kv.num_blocks)


def check_layouts(producer: KVLayout, consumer: KVLayout, what: str = "the prefill and decode instances") -> None:
    """EngineError unless KV blocks of `producer` can be copied as they are into `consumer`, rank
    by rank."""
    differences = [f"{f.name} {getattr(producer, f.name)} vs {getattr(consumer, f.name)}" for f in fields(KVLayout)
                   if f.name != "num_blocks" and getattr(producer, f.name) != getattr(consumer, f.name)]
    if differences:
        raise EngineError(f"the KV caches of {what} differ ({'; '.join(differences)}, prefill vs decode), so KV "
                          "blocks cannot move between them: give both roles the same model, KV dtype (and "
                          "--dtype), block_size, tp and pp")


def export_blocks(engine: Engine, block_ids: list[int]) -> torch.Tensor:
    """A copy of blocks `block_ids`, every rank's share: [ranks, share] (runner.export_kv)."""
    return engine.runner.export_kv(block_ids)


def import_blocks(engine: Engine, block_ids: list[int], blocks: torch.Tensor) -> None:
    """Write `blocks` (as `export_blocks` gives them) into blocks `block_ids` of `engine`'s ranks."""
    engine.runner.import_kv(block_ids, blocks)


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
        self.rank, self.producers, self.consumers = rank, producers, consumers
        # its own ranks: the default group's are the global ranks, a standalone group's are its own
        self.group: dist.ProcessGroup = group if group is not None else dist.group.WORLD
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
        """Receive `peer`'s messages on `tag` until it sends a zero length (closed) or its
        connection breaks (it died: whoever drives the instances finds out and acts)."""
        try:
            self._receive_from(peer, tag)
        except RuntimeError:
            return

    def _receive_from(self, peer: int, tag: int) -> None:
        while True:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.group.recv([length], peer, tag).wait()
            if int(length.item()) == 0:
                return
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
            self.group.recv([data], peer, tag).wait()
            header = pickle.loads(data.cpu().numpy().tobytes())
            if tag == self._ACK:
                self._arrivals.put((tag, header, None))
                continue
            transfer, shape, dtype = header
            blocks = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=self.device)
            self.group.recv([blocks], peer, tag).wait()
            self._arrivals.put((tag, transfer, blocks))

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._sending.append((self.group.send([tensor], dst, tag), tensor))
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
        blocks = blocks.to(self.device).contiguous()
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
            try:
                self._isend(torch.zeros(1, dtype=torch.int64, device=self.device), peer, tag)
            except RuntimeError:  # that peer is gone
                pass
        for work, _ in self._sending:
            try:
                work.wait()
            except RuntimeError:
                pass
        self._sending.clear()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s)
        self._inbox.clear()
        self._acked.clear()


# ------------------------------------------------------------------------------ the moves


def send_kv(engine: Engine, transport: KVTransport, transfer: KVTransfer) -> int:
    """Producer: start moving the blocks `transfer` names out of `engine`'s pool; their bytes."""
    blocks = export_blocks(engine, list(transfer.src_blocks))
    transport.send(transfer, blocks)
    return blocks.numel() * blocks.element_size()


def receive_kv(engine: Engine, transport: KVTransport, consumer: int) -> list[KVTransfer]:
    """Consumer `consumer` (`engine`): write the KV that arrived into the blocks each request
    reserved, run those requests from the next step, and acknowledge. A transfer whose request
    is no longer waiting for it here (aborted on its way) is dropped."""
    layout, arrived = kv_layout(engine), []
    for transfer, blocks in transport.recv(consumer):
        if not engine.scheduler.parked(transfer.request_id, SequenceStatus.RECEIVING):
            continue
        check_layouts(transfer.layout, layout, f"prefill instance {transfer.producer} and decode instance {consumer}")
        import_blocks(engine, list(transfer.dst_blocks), blocks)
        engine.scheduler.arrived(transfer.request_id)
        transport.ack(transfer)
        arrived.append(transfer)
    return arrived


def settle_kv(engine: Engine, transport: KVTransport, producer: int) -> list[KVTransfer]:
    """Producer `producer` (`engine`): free the blocks of the requests whose KV was acknowledged
    (an acknowledgement for a request no longer parked here, aborted meanwhile, is dropped)."""
    settled = []
    for transfer in transport.acks(producer):
        if engine.scheduler.parked(transfer.request_id, SequenceStatus.PREFILLED):
            engine.scheduler.release(transfer.request_id)
            settled.append(transfer)
    return settled


