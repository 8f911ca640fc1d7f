"""Spec texts and helpers shared by the tests."""

from __future__ import annotations

import flowc
from flowc.compiler.frontend.check import Checker
from flowc.compiler.frontend.imports import Program
from flowc.compiler.frontend.parser import parse
from flowc.compiler.source import SourceFile
from flowc.compiler.units import Value

# A complete, valid deployment spec that exercises every kind of declaration.
VALID_SPEC = """\
use std.gpus
use std.models

## Two 8-GPU H100 nodes
cluster lab {
  node x 2 {
    gpu h100-sxm x 8
    host_memory 2 TiB
  }
  network ib-ndr x 8
}

workload chat {
  arrival poisson 12 req/s
  prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok
  output lognormal(median 256 tok, sigma 0.8) max 2048 tok
  requests 2000 req
}

slo interactive {
  ttft p90 <= 500 ms
  tpot p99.9 <= 50 ms
  attainment >= 90 %
}

deploy chatbot {
  model llama-3.1-70b { weights fp8; kv fp8 }
  on lab
  serve chat under interactive
  objective max goodput_per_gpu
  tp in [2, 4, 8]
  pp 1
  max_gpus 16
  allow disaggregation, offload
}
"""

# A gpu declaration whose `memory` line is replaced by the tests.
GPU_TEMPLATE = """\
use std.links
gpu g {
  vendor nvidia
  memory %s
  memory_bandwidth 3.35 TB/s
  flops bf16 989 TFLOP/s
  interconnect nvlink4
  host_link pcie5
}
"""


# A small Llama on a CPU "GPU" of `{memory}` bytes with 1 GiB of host memory and `allow offload`:
# a memory just under what the model needs makes the compiler offload weights.
OFFLOAD_SPEC = """use std.links

gpu small-cpu {{
  vendor cpu
  memory {memory} B
  memory_bandwidth 20 GB/s
  flops fp32 100 GFLOP/s
  flops bf16 100 GFLOP/s
  interconnect cpu-memory
  host_link cpu-memory
}}

model small-llama {{
  architecture llama
  layers 2
  hidden 256
  heads 4
  kv_heads 2
  head_dim 64
  ffn 512
  vocab 1024
  max_context 512 tok
  weights fp32
  kv fp32
  tied_embeddings false
  attention_bias false
  mlp gated
}}

cluster box {{
  node x 1 {{
    gpu small-cpu x 1
    host_memory 1 GiB
  }}
}}

workload chat {{
  arrival poisson 1 req/s
  prompt uniform(4 tok, 8 tok)
  output uniform(2 tok, 4 tok)
}}

slo relaxed {{
  ttft p90 <= 5 s
  tpot p90 <= 1 s
}}

deploy small {{
  model small-llama
  on box
  serve chat under relaxed
  allow offload
  tp in [1]
  max_batched_tokens in [64 tok]
  max_seqs in [8]
}}
"""


def evaluate(text: str) -> Value:
    """The value of one argument, as the checker evaluates it (units applied, exact)."""
    module = parse(SourceFile("<value>", "x y { k %s }" % text))
    checker = Checker(Program())
    value = checker.value(module.decls[0].body.statements[0].args[0])
    assert not checker.errors, [d.message for d in checker.errors]
    return value


def load_error(text: str) -> flowc.FlowError:
    """The FlowError that loading `text` raises (fails the test if it loads)."""
    try:
        flowc.load(text)
    except flowc.FlowError as error:
        return error
    raise AssertionError("the spec loaded without errors")
