"""Spec texts and helpers shared by the front-end tests."""

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
