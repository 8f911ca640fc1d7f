"""An instance in a process of its own: `RemoteInstance` runs one `Engine` in a worker process
and answers, through a pipe, what `DisaggregatedEngine` asks of an instance (the `Engine`
methods it calls, and the three KV moves of kv_transport.py). The workers of one deployment
form a standalone gloo group (`kv_group`; rank k is the k-th instance, prefill instances
first), and the KV moves worker to worker over `TorchDistributedTransport`; this process only
routes requests and tells each side when to move what. An instance of tp or pp above 1 is rank
0 of its own ranks, as `Engine` always runs it (torch.distributed's default group is theirs):
its KV is gathered from its ranks before it leaves, and scattered to the consumer's ranks when
it arrives (`runner.DistributedRunner.export_kv`).

The front keeps its own `RequestOutput` of every request; each answer that changes one (a
step's tokens, a finish, an abort) carries the worker's copy, and the front's is updated in
place, so `generate` and `stream` see the same objects as with in-process instances. The
engine clock is shared: perf_counter is the machine's monotonic clock in every process, and
each worker counts from the front's start (`set_clock`).

A worker that dies or stops answering for `timeout_s` raises `RankFailure` in this process.
"""

from __future__ import annotations

import os
import pickle
import traceback
from dataclasses import dataclass, fields
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowc.compiler.plan import Plan

from .engine import Engine, Request, RequestOutput, TokenEvent
from .kv_transport import KVLayout, KVTransfer, TorchDistributedTransport, kv_layout, receive_kv, send_kv, settle_kv
from .runner import RankFailure
from .sequence import Sequence

# The group's own timeout outlasts any idle spell: a gloo receive that times out closes its pair
# for good, and the transport's receiving threads wait as long as no KV comes. A hung instance is
# found by the front instead (`timeout_s` on every answer); a dead one closes its connections.
GROUP_TIMEOUT = timedelta(days=7)
_KEPT = ("instances",)  # the front's own fields of an output (which instances served it)


def _update(output: RequestOutput, copy: RequestOutput) -> None:
    for f in fields(RequestOutput):
        if f.name not in _KEPT:
            setattr(output, f.name, getattr(copy, f.name))


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its instance and join the deployment's group (picklable)."""

    plan: Plan
    deployment: str
    group: int  # index of the instance's group in the deployment
    weights: Optional[Path]
    options: dict[str, Any]  # Engine.for_group's dtype, backend, seed, share_cores, timeout_s
    rank: int
    world: int
    port: int
    producers: dict[int, int]  # prefill instance index -> rank
    consumers: dict[int, int]  # decode instance index -> rank
    device: str  # where the instance runs: the group's device
    timeout_s: float


class _Worker:
    """The worker's side: its engine, its transport, and the outputs of the requests it holds."""

    def __init__(self, spec: WorkerSpec):
        dp = next(d for d in spec.plan.deployments if d.name == spec.deployment)
        self.group = kv_group(spec)  # first: every worker waits here for the others
        self.engine = Engine.for_group(spec.plan, dp, dp.groups[spec.group], spec.weights, **spec.options)
        self.transport = TorchDistributedTransport(spec.rank, spec.producers, spec.consumers, self.group,
                                                   timeout_s=spec.timeout_s)
        self.outputs: dict[str, RequestOutput] = {}

    def describe(self) -> tuple[Any, KVLayout]:
        return self.engine.config, kv_layout(self.engine)

    def set_clock(self, start: float) -> None:
        self.engine.set_clock(start)

    def validate(self, request: Request) -> None:
        self.engine._validate(request)

    def unservable(self, num_tokens: int, prompt_only: bool) -> Optional[str]:
        return self.engine.scheduler.unservable(num_tokens, prompt_only=prompt_only)

    def queue(self, request: Request, request_id: str, arrival_time: float, handoff: bool) -> RequestOutput:
        output = self.engine._queue(request, request_id, arrival_time, handoff=handoff)
        self.outputs[request_id] = output
        return output

    def poll(self) -> tuple[list[TokenEvent], dict[str, RequestOutput], list[Sequence], bool]:
        events = self.engine.poll()
        changed = {e.request_id: self.outputs[e.request_id] for e in events if e.request_id in self.outputs}
        for event in events:
            if event.finish_reason is not None:
                self.outputs.pop(event.request_id, None)
        return events, changed, self.engine.scheduler.take_prefilled(), self.engine.has_work()

    def hand_off(self, request_id: str) -> None:
        self.engine.hand_off(request_id)
        del self.outputs[request_id]

    def take_over(self, prefilled: Sequence, output: RequestOutput) -> list[int]:
        seq = self.engine.take_over(prefilled, output)
        output.output_token_ids = seq.output_token_ids  # one list, whatever pickling kept shared
        self.outputs[output.request_id] = output
        return list(seq.block_ids)

    def can_receive(self, num_tokens: int) -> bool:
        return self.engine.scheduler.can_receive(num_tokens)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        self.outputs.pop(request_id, None)
        return self.engine._abort(request_id)

    def release(self, request_id: str) -> None:
        self.engine.scheduler.release(request_id)

    def send_kv(self, transfer: KVTransfer) -> int:
        return send_kv(self.engine, self.transport, transfer)

    def receive_kv(self, consumer: int) -> list[KVTransfer]:
        return receive_kv(self.engine, self.transport, consumer)

    def settle_kv(self, producer: int) -> list[KVTransfer]:
        return settle_kv(self.engine, self.transport, producer)

    def close(self) -> None:
        self.transport.close()
        self.engine.close()


def _serve(conn: Connection, spec: WorkerSpec) -> None:
    """A worker: join the deployment's KV group, build the instance, then answer each (method,
    args) from the pipe with ("ok", result) or ("error", exception) until "close" (or until the
    front's end of the pipe closes: it is gone)."""
    if spec.device == "cpu":  # the instances share this host's cores: one thread pool each would oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    try:
        worker = _Worker(spec)
    except Exception as error:  # the front raises it (an EngineError says what to fix)
        conn.send(("error", _picklable(error)))
        return
    conn.send(("ok", worker.describe()))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            worker.close()
            return
        try:
            result = getattr(worker, method)(*args)
        except Exception as error:
            conn.send(("error", _picklable(error)))
            continue
        conn.send(("ok", result))
        if method == "close":
            return


def kv_group(spec: WorkerSpec) -> dist.ProcessGroup:
    """The deployment's KV group, standalone (not torch.distributed's default group, which an
    instance of tp or pp above 1 uses for its own ranks): gloo over a TCP store that the rank 0
    worker hosts. On GPUs the KV passes through host memory."""
    store = dist.TCPStore("127.0.0.1", spec.port, spec.world, is_master=spec.rank == 0,
                          timeout=timedelta(seconds=spec.timeout_s))
    return dist.ProcessGroupGloo(store, spec.rank, spec.world, GROUP_TIMEOUT)


def _picklable(error: Exception) -> Exception:
    """`error`, or a RuntimeError with its message when it cannot cross the pipe."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError("".join(traceback.format_exception_only(type(error), error)).strip())


class _RemoteScheduler:
    """The scheduler calls `DisaggregatedEngine` makes on an instance, answered by its worker."""

    def __init__(self, instance: "RemoteInstance"):
        self._instance = instance
        self.prefilled: list[Sequence] = []  # from the last poll

    def take_prefilled(self) -> list[Sequence]:
        prefilled, self.prefilled = self.prefilled, []
        return prefilled

    def can_receive(self, num_tokens: int) -> bool:
        return self._instance._call("can_receive", num_tokens)

    def unservable(self, num_tokens: int, prompt_only: bool = False) -> Optional[str]:
        return self._instance._call("unservable", num_tokens, prompt_only)

    def release(self, request_id: str) -> None:
        self._instance._call("release", request_id)


@dataclass(frozen=True)
class _Received:
    block_ids: list[int]


class RemoteInstance:
    """One instance of a deployment in a worker process (module docstring). Start every
    instance of the deployment (`start`) before `connect`ing any: they meet in one group."""

    def __init__(self, spec: WorkerSpec):
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self.timeout_s, self.rank = spec.timeout_s, spec.rank
        # not a daemon: an instance of tp or pp above 1 starts its ranks' processes itself
        self.process = context.Process(target=_serve, args=(child, spec), name=f"flowc-instance-{spec.rank}")
        self.process.start()
        child.close()
        self.scheduler = _RemoteScheduler(self)
        self._outputs: dict[str, RequestOutput] = {}  # the front's outputs of the requests held there
        self._has_work = False
        self.config: Any = None
        self.layout: Optional[KVLayout] = None
        self._closed = self._closing = self._polling = False

    def connect(self) -> None:
        """Wait until the worker built its instance; its error (an EngineError) if it could not."""
        self.config, self.layout = self._answer()

    def _answer(self) -> Any:
        if not self._conn.poll(self.timeout_s):
            raise RankFailure(f"instance process {self.rank} did not answer for {self.timeout_s:g} s"
                              if self.process.is_alive() else self._exited())
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):  # the worker's end of the pipe closed: it exited
            raise RankFailure(self._exited()) from None
        if status == "error":
            raise value
        return value

    def _exited(self) -> str:
        self.process.join(timeout=1)
        return f"instance process {self.rank} exited (exit code {self.process.exitcode})"

    def _send(self, method: str, *args: Any) -> None:
        try:
            if self.process.is_alive():
                self._conn.send((method, args))
                return
        except OSError:
            pass
        raise RankFailure(self._exited())

    def _call(self, method: str, *args: Any) -> Any:
        self._send(method, *args)
        return self._answer()

    # -- what DisaggregatedEngine calls on an Engine

    def set_clock(self, start: float) -> None:
        self._call("set_clock", start)

    def _validate(self, request: Request) -> None:
        self._call("validate", request)

    def _queue(self, request: Request, request_id: str, arrival_time: float, handoff: bool = False
               ) -> RequestOutput:
        output = self._call("queue", request, request_id, arrival_time, handoff)
        self._outputs[request_id] = output
        self._has_work = True
        return output

    def start_poll(self) -> None:
        """Start the worker's step without waiting for it (`poll` gives its events): instances in
        processes of their own step at once. Nothing else may be asked of it in between."""
        if not self._polling:
            self._send("poll")
            self._polling = True

    def poll(self) -> list[TokenEvent]:
        self.start_poll()
        self._polling = False
        events, changed, prefilled, self._has_work = self._answer()
        for request_id, copy in changed.items():
            _update(self._outputs[request_id], copy)
        for event in events:
            if event.finish_reason is not None:
                self._outputs.pop(event.request_id, None)
        self.scheduler.prefilled += prefilled
        return events

    def has_work(self) -> bool:
        return self._has_work

    def hand_off(self, request_id: str) -> RequestOutput:
        self._call("hand_off", request_id)
        return self._outputs.pop(request_id)

    def take_over(self, prefilled: Sequence, output: RequestOutput) -> _Received:
        block_ids = self._call("take_over", prefilled, output)
        self._outputs[output.request_id] = output
        self._has_work = True
        return _Received(block_ids)

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        copy = self._call("abort", request_id)
        output = self._outputs.pop(request_id, None)
        if copy is None or output is None:
            return None
        _update(output, copy)
        return output

    def send_kv(self, transfer: KVTransfer) -> int:
        return self._call("send_kv", transfer)

    def receive_kv(self, consumer: int) -> list[KVTransfer]:
        return self._call("receive_kv", consumer)

    def settle_kv(self, producer: int) -> list[KVTransfer]:
        return self._call("settle_kv", producer)

    def kill(self) -> None:
        """Stop a worker that failed (dead, or hung on an answer) at once."""
        self._closed = True
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def request_close(self) -> None:
        """Ask the worker to close without waiting for it (`close_all`)."""
        if not self._closing and self.process.is_alive():
            self._send("close")
            self._closing = True

    def close(self) -> None:
        """Close the worker and wait for it (at most `timeout_s`, then it is killed). A worker's
        transport waits for its peers' goodbyes: close the instances of a deployment together
        (`close_all`)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.request_close()
            if self._closing:
                self._answer()
        except RankFailure:
            pass
        self.process.join(timeout=self.timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def close_all(instances: list[RemoteInstance]) -> None:
    """Close every instance of a deployment: all are asked first, since each worker's transport
    waits for its peers' goodbyes before it ends."""
    for instance in instances:
        try:
            instance.request_close()
        except RankFailure:  # it exited: close() reaps it
            pass
    for instance in instances:
        instance.close()
