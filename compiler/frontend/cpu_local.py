"""`cpu-local`: a profile of the machine flowc runs on, so plans can target a CPU for tests.

The numbers are estimates, not measurements: memory is the engine's share of the RAM the OS
reports (a quarter, at most 4 GiB: a CPU device shares its memory with the OS and every other
program; declare your own `gpu` for another share), compute assumes
two 256-bit FMA units per core at 2.5 GHz (16 fp32 FMAs = 32 FLOP/cycle), bandwidth a typical
dual-channel DDR4/DDR5 server figure. Calibration from the user's own hardware refines them.
"""

from __future__ import annotations

import os

FP32_FLOP_PER_CYCLE = 32
ASSUMED_GHZ = 2.5
RAM_SHARE = 4  # the device gets 1/RAM_SHARE of the RAM
MAX_MEMORY = 4 * 2**30


def cpu_local_flow() -> str:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = 16 * 2**30
    memory = min(ram // RAM_SHARE // 2**20 * 2**20, MAX_MEMORY)  # whole MiB
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gflops = cores * ASSUMED_GHZ * FP32_FLOP_PER_CYCLE
    return f"""use std.links

## This machine's CPU, as a device (estimated; see compiler/frontend/cpu_local.py)
gpu cpu-local {{
  vendor cpu
  memory {memory} B                # a quarter of the RAM the OS reports, at most 4 GiB
  memory_bandwidth 20 GB/s          # assumed: typical DDR4/DDR5 figure
  flops fp32 {gflops:g} GFLOP/s     # {cores} cores x {ASSUMED_GHZ} GHz x {FP32_FLOP_PER_CYCLE} FLOP/cycle
  flops bf16 {gflops:g} GFLOP/s     # computed in fp32 on most CPUs
  interconnect cpu-memory
  host_link cpu-memory
}}
"""
