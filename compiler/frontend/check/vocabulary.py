"""The language's vocabulary: the kinds of declaration, each block's attributes, the words
that attributes accept, and how messages name what the user wrote."""

from __future__ import annotations

from flowc.compiler.frontend import ast
from flowc.compiler.spec import DTYPE_BYTES, SEARCH_KNOBS

KINDS = ("link", "gpu", "cluster", "model", "workload", "slo", "deploy")
KIND_NAMES = {"link": "link", "gpu": "gpu", "cluster": "cluster", "model": "model", "workload": "workload",
              "slo": "slo", "deploy": "deployment"}
DTYPES = tuple(DTYPE_BYTES)
LINK_KINDS = ("nvlink", "xgmi", "pcie", "infiniband", "ethernet", "memory")
GPU_LINK_KINDS = ("nvlink", "xgmi", "pcie", "memory")
NETWORK_KINDS = ("infiniband", "ethernet")
ARCHITECTURES = ("llama", "qwen2", "mixtral", "qwen3_moe", "deepseek_v3", "gptj")
SLO_METRICS = ("ttft", "tpot", "e2e")
TOKEN_KNOBS = ("max_batched_tokens", "chunk_size", "block_size")
METRIC_ALIASES = {"itl": "tpot", "latency": "e2e", "e2el": "e2e", "ttlt": "e2e", "tbt": "tpot"}

# The vocabulary of each block: attribute -> how to write it (shown in help lines).
SCHEMAS: dict[str, dict[str, str]] = {
    "link": {"kind": "kind nvlink", "bandwidth": "bandwidth 450 GB/s", "latency": "latency 2 us"},
    "gpu": {
        "vendor": "vendor nvidia", "memory": "memory 80 GiB", "memory_bandwidth": "memory_bandwidth 3.35 TB/s",
        "flops": "flops bf16 989 TFLOP/s", "interconnect": "interconnect nvlink4", "host_link": "host_link pcie5",
        "price": "price 2.5 usd/h", "overhead": "overhead step 0.3 ms",
    },
    "cluster": {"node": "node x 2 { gpu h100-sxm x 8 }", "network": "network ib-ndr x 8"},
    "node": {
        "gpu": "gpu h100-sxm x 8", "link": "link nvlink4", "link_domain": "link_domain 8",
        "host_memory": "host_memory 2 TiB", "host_link": "host_link pcie5", "price": "price 98 usd/h",
    },
    "model": {
        "architecture": "architecture llama", "layers": "layers 32", "hidden": "hidden 4096", "heads": "heads 32",
        "kv_heads": "kv_heads 8", "head_dim": "head_dim 128", "ffn": "ffn 14336", "vocab": "vocab 128256",
        "max_context": "max_context 131072 tok", "weights": "weights bf16", "kv": "kv bf16",
        "tied_embeddings": "tied_embeddings false", "attention_bias": "attention_bias false", "mlp": "mlp gated",
        "sliding_window": "sliding_window 4096 tok", "moe": "moe { experts 8; top_k 2 }",
        "mla": "mla { kv_lora_rank 512; qk_nope_head_dim 128; qk_rope_head_dim 64; v_head_dim 128 }",
    },
    "moe": {"experts": "experts 8", "top_k": "top_k 2", "expert_ffn": "expert_ffn 14336",
            "shared_experts": "shared_experts 1", "dense_layers": "dense_layers 3"},
    "mla": {"q_lora_rank": "q_lora_rank 1536", "kv_lora_rank": "kv_lora_rank 512",
            "qk_nope_head_dim": "qk_nope_head_dim 128", "qk_rope_head_dim": "qk_rope_head_dim 64",
            "v_head_dim": "v_head_dim 128"},
    "workload": {
        "arrival": "arrival poisson 12 req/s", "prompt": "prompt lognormal(median 1024 tok, sigma 0.6) max 8192 tok",
        "output": "output lognormal(median 256 tok, sigma 0.8) max 2048 tok", "requests": "requests 2000 req",
        "duration": "duration 10 min",
    },
    "slo": {"ttft": "ttft p90 <= 500 ms", "tpot": "tpot p90 <= 50 ms", "e2e": "e2e p99 <= 20 s",
            "attainment": "attainment >= 90 %"},
    "deploy": {
        "model": "model llama-3.1-70b", "on": "on my-cluster", "serve": "serve my-workload under my-slo",
        "objective": "objective max goodput_per_gpu", "max_gpus": "max_gpus 16", "engine": "engine vllm",
        "allow": "allow disaggregation, offload", "forbid": "forbid offload",
        **{knob: f"{knob} in [2048 tok, 8192 tok]" if knob in TOKEN_KNOBS else f"{knob} in [1, 2, 4]"
           for knob in SEARCH_KNOBS},
    },
    "override": {"weights": "weights fp8", "kv": "kv fp8", "max_context": "max_context 32768 tok"},
}
OVERHEAD_KINDS = ("step", "layer", "sequence", "token", "layer_token", "wake", "request")
REPEATABLE = {("gpu", "flops"), ("gpu", "overhead"), ("cluster", "node"), ("deploy", "allow"), ("deploy", "forbid")}


# How messages name what the user wrote (shared by the value readers and the block builders).

def with_article(noun: str) -> str:
    """`noun` with its indefinite article (by spelling, which serves flowc's words: "a unit")."""
    return ("an " if noun[0] in "aeio" else "a ") + noun


def describe(expr: ast.Expr) -> str:
    return {
        ast.Name: "a name", ast.Number: "a number", ast.Quantity: "a quantity", ast.String: "a string",
        ast.Operator: "a comparison", ast.ListExpr: "a list", ast.TupleExpr: "several values",
        ast.Call: "a call", ast.BinOp: "an expression", ast.Paren: "an expression",
    }[type(expr)]


def expr_text(expr: ast.Expr) -> str:
    """An expression as the formatter writes it."""
    from flowc.compiler.frontend.fmt import format_expr

    return format_expr(expr)
