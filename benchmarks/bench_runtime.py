"""The runtime on this machine: engine throughput against transformers `generate`, and a replay
of a compiled plan with measured next to predicted latencies.

1. Throughput. One random-weight Llama-shaped model (built with transformers, saved, loaded by
   both), the same 64 requests of mixed lengths (prompts 16-256 tokens, outputs 16-128 tokens,
   greedy, no early stop), fp32 on CPU. transformers runs `generate` two ways: one request at a
   time (no padding, so its tokens are the reference), and in batches of 16 with left padding
   (its batched speed; padding may change a near-tied argmax, so its tokens are not compared).
   The engine runs all 64 through its scheduler with a plan whose token budget is 512.
   Printed: output tokens/s of each, the engine's speedup, and how many requests' tokens equal
   the one-at-a-time reference.
2. Replay. examples/tiny-cpu.flow compiled, then `flowc run --replay` in-process: measured and
   predicted TTFT/TPOT (the gap is CPU time per step, which the cost model does not model until
   the hardware is calibrated).

On a GPU (`--device cuda`, e.g. `--dtype bf16 --hidden 2048 --layers 16 --vocab 32000`) both run
on it and the engine uses the Triton kernels; in 16-bit, rounding differs between the two
implementations, so fewer outputs are identical and that count is a sanity check only.

Run: python benchmarks/bench_runtime.py [--requests 64] [--hidden 512] [--layers 4] [--device cpu|cuda]
     [--dtype fp32|bf16] [--skip-replay]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.compiler.spec import Model
from flowc.runtime import Engine, Request, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(path: Path, hidden: int, layers: int, vocab: int, dtype: str) -> Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads = hidden // 64, max(1, hidden // 256)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():  # wider than HF's init, so greedy argmaxes are not near-ties
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf.save_pretrained(path)
    return Model(name="bench-llama", architecture="llama", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                 head_dim=64, ffn=config.intermediate_size, vocab=vocab, max_context=1024, weights=dtype, kv=dtype)


def workload(n: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [([rng.randrange(vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 128)) for _ in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hf_generate(path: Path, requests, batch: int, device: str, dtype: str) -> tuple[list[list[int]], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    model.generation_config.pad_token_id = 0
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
        longest = max(n for _, n in chunk)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=False)
        outputs.extend(row[width:width + n].tolist() for row, (_, n) in zip(out, chunk))
    _sync(device)
    return outputs, time.perf_counter() - start


def engine_generate(path: Path, model: Model, requests, device: str) -> tuple[list[list[int]], float]:
    vendor = "nvidia" if device == "cuda" else "cpu"
    plan = instance_plan(model, vendor=vendor, max_batched_tokens=512, max_seqs=64, kv_blocks=4096)
    with Engine.from_plan(plan, path) as engine:
        engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=2))])  # warm up
        start = time.perf_counter()
        outputs = engine.generate([Request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in requests])
        _sync(device)
        return [o.output_token_ids for o in outputs], time.perf_counter() - start


def throughput(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        model = build_model(path, args.hidden, args.layers, args.vocab, args.dtype)
        requests = workload(args.requests, args.vocab)
        tokens = sum(n for _, n in requests)
        where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
        print(f"model: llama-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, "
              f"{where}; {len(requests)} requests, {tokens} output tokens")
        engine_out, engine_s = engine_generate(path, model, requests, args.device)
        reference, single_s = hf_generate(path, requests, 1, args.device, args.dtype)
        _, batched_s = hf_generate(path, requests, 16, args.device, args.dtype)
        same = sum(a == b for a, b in zip(engine_out, reference))
        print(f"  transformers generate, one at a time : {tokens / single_s:8.1f} tok/s ({single_s:.1f} s)")
        print(f"  transformers generate, batches of 16 : {tokens / batched_s:8.1f} tok/s ({batched_s:.1f} s)")
        print(f"  flowc engine, continuous batching    : {tokens / engine_s:8.1f} tok/s ({engine_s:.1f} s)")
        print(f"  speedup vs one at a time {single_s / engine_s:.2f}x, vs batches of 16 {batched_s / engine_s:.2f}x; "
              f"identical outputs: {same}/{len(requests)} requests")


def replay(args) -> None:
    import flowc
    import flowc.cli

    with tempfile.TemporaryDirectory() as folder:
        plan = Path(folder) / "plan.json"
        plan.write_text(flowc.compile(ROOT / "examples" / "tiny-cpu.flow").model_dump_json())
        print("\nreplay of examples/tiny-cpu.flow (64 requests at the spec's arrival times):")
        flowc.cli.main(["run", str(plan), "--replay", "--requests", "64"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--skip-replay", action="store_true", help="only the throughput comparison")
    args = parser.parse_args()
    throughput(args)
    if not args.skip_replay:
        replay(args)


if __name__ == "__main__":
    main()
