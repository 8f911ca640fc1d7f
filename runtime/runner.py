"""Model runners: own the model, the KV pool and the workspace of one instance, and run steps.

`LocalRunner` runs the whole instance in this process (tp 1). `DistributedRunner` runs one
process per tensor-parallel rank over torch.distributed (gloo on CPU, NCCL on GPUs): this
process is rank 0, spawns the others, and broadcasts each step's inputs; every rank runs the
same forward on its shard and rank 0 gets the full logits.

Both build a rank's state the same way (`_RankState`): the model from the plan's model (random
weights from the seed, or a local HF directory), the KV pool with the plan's block count and
size, and the activation workspace at the plan's arena offsets. Step inputs are copied into
the workspace buffers the step graph names (`input_ids`, `positions`, `slot_mapping`,
`logits_indices`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .config import ModelConfig
from .kernels import get_ops
from .model import CausalLM, StepInputs
from .parallel import Parallel, free_port
from .weights import load_weights
from .workspace import HeapWorkspace, Workspace

INDEX_INPUTS = ("input_ids", "positions", "slot_mapping", "logits_indices")


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


class _RankState:
    def __init__(self, spec: RunnerSpec, parallel: Parallel):
        device = torch.device(spec.device if spec.device == "cpu" else f"cuda:{parallel.tp_rank}")
        self.device = device
        c = spec.config
        self.model = CausalLM(c, get_ops(spec.backend, str(device)), parallel, spec.dtype, device)
        if spec.weights is not None:
            load_weights(self.model, spec.weights)
        else:
            self.model.init_random(spec.seed)
        self.kv = self.model.make_kv_cache(spec.num_blocks, spec.block_size, spec.kv_dtype)
        if spec.arena_offsets:
            self.workspace = Workspace(spec.arena_offsets, spec.arena_sizes, spec.dtype, device)
        else:
            self.workspace = HeapWorkspace(device)

    def run(self, inputs: dict[str, list]) -> torch.Tensor:
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
            return self.model(step, self.kv, self.workspace)


class LocalRunner:
    def __init__(self, spec: RunnerSpec):
        self.state = _RankState(spec, Parallel())

    def run(self, inputs: dict[str, list]) -> torch.Tensor:
        return self.state.run(inputs)

    def close(self):
        pass


def _backend(spec: RunnerSpec) -> str:
    return "gloo" if spec.device == "cpu" else "nccl"


def _worker(index: int, spec: RunnerSpec, port: int):
    """Rank index + 1: build its shard, then run every step rank 0 broadcasts until None."""
    rank = index + 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(_backend(spec), rank=rank, world_size=spec.tp)
    try:
        state = _RankState(spec, Parallel(tp_rank=rank, tp_size=spec.tp))
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                return
            state.run(message[0])
    finally:
        dist.destroy_process_group()


class DistributedRunner:
    def __init__(self, spec: RunnerSpec):
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine is already running in this process; close it first")
        port = free_port()
        self.workers = mp.start_processes(_worker, args=(spec, port), nprocs=spec.tp - 1, join=False,
                                          start_method="spawn")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(_backend(spec), rank=0, world_size=spec.tp)
        self.state = _RankState(spec, Parallel(tp_rank=0, tp_size=spec.tp))

    def run(self, inputs: dict[str, list]) -> torch.Tensor:
        dist.broadcast_object_list([inputs], src=0)
        return self.state.run(inputs)

    def close(self):
        if not dist.is_initialized():
            return
        dist.broadcast_object_list([None], src=0)
        self.workers.join()
        dist.destroy_process_group()


def make_runner(spec: RunnerSpec):
    return LocalRunner(spec) if spec.tp == 1 else DistributedRunner(spec)
