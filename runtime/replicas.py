"""Replicas: every instance of a colocated deployment behind the router the plan was predicted
with (`compiler.model.instance.ROUTER`, least work: a request goes to the instance with the
fewest tokens still to compute, prompt and output, of the requests it holds).

`ReplicatedEngine.from_plan(plan)` builds one `Engine` per instance, all in this process (each
tp = pp = 1: one process group per process), on one clock, and serves requests through
`ServingAPI` like `Engine`. A `poll` steps every instance once, so on one machine the instances
take turns: measured latencies are those of instances sharing its cores, not of a deployment.
`open_plan` picks this engine for a colocated deployment of several instances of tp = pp = 1;
one of larger instances runs one instance (`Engine`).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Optional

from flowc.compiler.plan import DeploymentPlan, Plan

from .engine import Engine, EngineError, Request, RequestOutput, ServingAPI, TokenEvent, _deployment, load_plan
from .sequence import RequestError


class ReplicatedEngine(ServingAPI):
    """The instances of a colocated deployment behind the least-work router (module docstring)."""

    def __init__(self, plan: Plan, dp: DeploymentPlan, engines: list[Engine]):
        self.plan_document, self.plan, self.engines = plan, dp, engines
        self.config = engines[0].config
        self._ids = itertools.count()
        self._live: dict[str, RequestOutput] = {}
        self._events: list[TokenEvent] = []
        self._routes: dict[str, int] = {}  # request id -> its instance
        self._max_tokens: dict[str, int] = {}
        self._clock_start = time.perf_counter()
        for engine in engines:  # one clock: the outputs of all instances compare
            engine.set_clock(self._clock_start)

    @classmethod
    def from_plan(cls, plan: Plan | str | Path, weights: str | Path | None = None, *,
                  deployment: Optional[str] = None, dtype: Optional[str] = None, backend: str = "auto",
                  seed: int = 0) -> "ReplicatedEngine":
        """An `Engine` for every instance of `plan`'s colocated deployment (`Engine.from_plan`'s
        arguments; random weights are the same on every instance)."""
        p = load_plan(plan)
        dp = _deployment(p, deployment)
        if any(g.role != "colocated" or g.tp * g.pp > 1 for g in dp.groups):
            raise EngineError(f"deployment `{dp.name}` is not made of colocated tp 1 x pp 1 instances: run one "
                              "instance with `Engine.from_plan` (or `open_plan`)")
        engines: list[Engine] = []
        try:
            for g in dp.groups:
                for _ in g.instances:
                    engines.append(Engine.for_group(p, dp, g, weights, dtype=dtype, backend=backend, seed=seed))
            return cls(p, dp, engines)
        except BaseException:
            for engine in engines:
                engine.close()
            raise

    def _validate(self, request: Request) -> None:
        for engine in self.engines:  # whichever the router picks must take it
            engine._validate(request)

    def _queue(self, request: Request, request_id: str, arrival_time: float) -> RequestOutput:
        if request_id in self._live:
            raise RequestError(f"duplicate request id {request_id!r}: a request with this id is in flight")
        load = [0] * len(self.engines)
        for rid, k in self._routes.items():
            load[k] += self._left(rid)
        k = min(range(len(self.engines)), key=load.__getitem__)  # the first of the least loaded
        output = self.engines[k]._queue(request, request_id, arrival_time)
        output.instances = (f"colocated {k}",)
        self._live[request_id], self._routes[request_id] = output, k
        self._max_tokens[request_id] = request.params.max_tokens
        return output

    def _left(self, request_id: str) -> int:
        """Tokens the request still needs computed: its prompt until its first token, and the
        outputs it has not got (its output list grows as it runs)."""
        out = self._live[request_id]
        done = len(out.output_token_ids)
        return (0 if done else len(out.prompt_token_ids)) + self._max_tokens[request_id] - done

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        if request_id not in self._live:
            return None
        output = self.engines[self._routes[request_id]]._abort(request_id)
        self._forget(request_id)
        return output

    def _forget(self, request_id: str) -> None:
        del self._live[request_id], self._routes[request_id], self._max_tokens[request_id]

    def now(self) -> float:
        return time.perf_counter() - self._clock_start

    def has_work(self) -> bool:
        return bool(self._events) or any(engine.has_work() for engine in self.engines)

    def poll(self) -> list[TokenEvent]:
        """One step of every instance; the events since the last call, instance by instance."""
        events, self._events = self._events, []
        for engine in self.engines:
            events += engine.poll()
        for event in events:
            if event.finish_reason is not None and event.request_id in self._live:
                self._forget(event.request_id)
        return events

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
