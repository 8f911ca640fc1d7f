"""Engine profiles: what a serving engine adds to a prediction beyond the model and the GPU.

A prediction is for one engine (`engine vllm|sglang|trtllm|flowc` in a deployment, `engine=` in
`flowc.estimate`), because engines run different kernels and spend different time outside them.
A profile names:
- `kernels`: the measured kernel tables its operator curves are fitted on (a key of
  `stdlib/calibration.json`: "vllm" is the default set; a GPU without the engine's own tables
  uses vLLM's, and `CostModel.calibration_source` says so);
- `overheads`: engine time per iteration beyond the kernels, in the GPU `overhead` kinds
  (model/operators.py): per step, per layer and step, per sequence, per request. A GPU that
  declares its own `overhead` (measured by `flowc calibrate`) keeps it;
- `mixed_prefill`: whether its iterations mix prefill chunks with decodes (the simulator's
  `InstanceConfig.mixed_prefill`);
- `max_seqs`: the engine's own cap on running sequences when its user sets none (None: only
  the KV cache bounds them). The optimizer searches its own values (model/search.py); this is
  what a benchmark of the engine with its defaults ran.

The profiles and where each figure comes from live in `stdlib/engines.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Mapping, Optional

from flowc.compiler.spec import ENGINES, MAX_KNOB

__all__ = ["ENGINES", "EngineProfile", "default_engine", "default_max_seqs", "engine_profile"]


@dataclass(frozen=True)
class EngineProfile:
    name: str
    label: str
    kernels: str
    overheads: Mapping[str, float] = field(default_factory=dict)
    mixed_prefill: bool = True
    max_seqs: Optional[int] = None
    source: str = ""


@cache
def _profiles() -> tuple[str, dict[str, EngineProfile]]:
    data = json.loads(resources.files("flowc.stdlib").joinpath("engines.json").read_text(encoding="utf-8"))
    profiles = {name: EngineProfile(name=name, label=p["label"], kernels=p["kernels"],
                                    overheads=dict(p.get("overheads", {})),
                                    mixed_prefill=p["mixed_prefill"], max_seqs=p.get("max_seqs"),
                                    source=p.get("source", ""))
                for name, p in data["engines"].items()}
    return data["default"], profiles


def default_engine() -> str:
    """The engine a deployment that names none is predicted for (the standard library's)."""
    return _profiles()[0]


def engine_profile(name: str | None = None) -> EngineProfile:
    """The profile of engine `name` (default: `default_engine()`); KeyError for a name outside
    ENGINES."""
    return _profiles()[1][name or default_engine()]


def default_max_seqs(name: str | None = None) -> int:
    """The running-sequence cap engine `name` applies when its user sets none: its profile's, or
    MAX_KNOB for an engine without one (only its KV cache bounds the batch)."""
    return engine_profile(name).max_seqs or MAX_KNOB
