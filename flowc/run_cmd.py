"""`flowc run`: execute a plan with the flowc runtime.

Two modes:
  * `--prompts FILE.jsonl`: one request per line, `{"prompt_token_ids": [...]}` (or `"prompt":
    "text"` when the weights directory has a tokenizer) plus optional sampling fields
    (`max_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop_token_ids`, `ignore_eos`, `id`).
    Prints one JSON line per request on stdout. A bad line is that request's error; the others
    still run; the exit code is 1 when any request failed.
  * `--replay`: the spec's workload (or trace), sampled as the compiler samples it, submitted
    at its arrival times stretched by `--time-scale`, with random prompt tokens and exactly the
    sampled output lengths. Prints measured TTFT, TPOT and throughput next to what the plan's
    cost model predicts for the same requests on one instance of the plan (on every instance
    of a disaggregated plan: its prefill and decode instances all run, in this process, or
    with `--processes` each in a process of its own).
A disaggregated plan runs through `flowc.runtime.open_plan` like a colocated one.
`--launcher torchrun` (what the scripts of `flowc launch` pass): torchrun started every rank of
the instance, on one node or many; rank 0 runs the requests and prints, the others serve its
steps and print nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from flowc.compiler.diagnostics import escape_control

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos")
EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_arguments(parser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a plan written by `flowc compile -o PLAN.json`")
    parser.add_argument("--weights", metavar="DIR", help="a local Hugging Face model directory (default: random "
                        "weights from --seed)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompts", metavar="FILE.jsonl", help="requests to run, one JSON object per line")
    mode.add_argument("--replay", action="store_true", help="replay the spec's workload at its arrival times")
    parser.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                        help="stretch replay arrival times by X (X > 1 replays slower than the spec)")
    parser.add_argument("--requests", type=int, default=64, metavar="N", help="requests to replay (default 64)")
    parser.add_argument("--deployment", metavar="NAME", help="the deployment to run (when the plan has several)")
    parser.add_argument("--against", metavar="SPEC", help="the spec for --replay (default: the plan's spec_files[0])")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="kernels: Triton on GPUs, the torch reference on CPU (auto)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="override the plan's dtypes")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and replay prompts")
    parser.add_argument("--processes", action="store_true",
                        help="a disaggregated plan: each prefill and decode instance in a process of its own, the "
                             "KV moving between them over torch.distributed (default: all in this process)")
    parser.add_argument("--launcher", choices=("spawn", "torchrun"), default="spawn",
                        help="spawn: this process starts the instance's other ranks here (default); torchrun: "
                             "torchrun started them (the scripts of `flowc launch`)")


def cmd_run(args, out) -> int:
    try:
        from flowc.runtime.engine import EngineError
    except ImportError as error:
        if not (error.name or "").startswith("torch"):  # a broken install of flowc itself is not this
            raise
        return out.usage_error(f"the flowc runtime needs torch ({error})",
                               'install it with `pip install "flowc[runtime]"`')
    from flowc.plan_io import read_plan
    from flowc.runtime.disagg import open_plan

    if args.time_scale <= 0 or not math.isfinite(args.time_scale):
        return out.usage_error(f"--time-scale must be a positive number (got {args.time_scale})")
    if args.requests < 1:
        return out.usage_error(f"--requests must be at least 1 (got {args.requests})")
    backend = _backend_problem(args.backend)
    if backend is not None:
        return out.usage_error(*backend)
    plan = read_plan(args.plan, out)
    if isinstance(plan, int):
        return plan
    if args.launcher == "torchrun":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return out.usage_error("--launcher torchrun, but torchrun did not start this process (no RANK and "
                                   "WORLD_SIZE)", "run the scripts `flowc launch` writes, or leave --launcher out")
        if os.environ["RANK"] != "0":
            return _serve_rank(args, plan)
    lines = _prompt_lines(args.prompts, out) if args.prompts is not None else None
    if isinstance(lines, int):
        return lines
    try:
        options = {"launcher": "torchrun"} if args.launcher == "torchrun" else {}
        engine = open_plan(plan, args.weights, deployment=args.deployment, dtype=args.dtype,
                           backend=args.backend, seed=args.seed, processes=args.processes, **options)
    except (EngineError, ValueError) as error:  # WeightsError and UnsupportedModel are ValueErrors
        sys.stderr.write(f"error: {escape_control(str(error))}\n")
        return EXIT_INVALID
    with engine:
        if args.replay:
            return _replay(args, engine, out)
        return _prompts(args, lines, engine)


def _serve_rank(args, plan) -> int:
    """A rank other than 0 of a torchrun-started instance: serve rank 0's steps until it closes."""
    from flowc.runtime.engine import EngineError, run_rank

    try:
        run_rank(plan, args.weights, deployment=args.deployment, dtype=args.dtype, backend=args.backend,
                 seed=args.seed)
    except (EngineError, ValueError, RuntimeError) as error:  # RuntimeError: torch.distributed's
        sys.stderr.write(f"error: rank {escape_control(os.environ['RANK'])}: {escape_control(str(error))}\n")
        return EXIT_INVALID
    return EXIT_OK


def _backend_problem(backend: str) -> tuple[str, str] | None:
    """(message, help) when `--backend` cannot run on this machine at all (the engine checks
    again on the device the plan picks)."""
    import torch

    from flowc.runtime.kernels import backend_problem

    return backend_problem(backend, "cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------- prompts


def _tokenizer(weights: str | None):
    """The weights directory's tokenizer (tokenizer.json via the `tokenizers` package), or None."""
    if weights is None or not (Path(weights) / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(Path(weights) / "tokenizer.json"))


def _request(line: str, number: int, tokenizer):
    """A Request from one JSONL line; ValueError with the reason when the line is not one."""
    from flowc.runtime.engine import Request
    from flowc.runtime.sequence import SamplingParams

    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(item, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(item) - {"id", "prompt", "prompt_token_ids", *SAMPLING_FIELDS})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: id, prompt, prompt_token_ids, "
                         f"{', '.join(SAMPLING_FIELDS)})")
    if "prompt_token_ids" in item:
        tokens = item["prompt_token_ids"]
        if not isinstance(tokens, list):
            raise ValueError("prompt_token_ids must be a list of token ids")
    elif "prompt" in item:
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: give --weights a directory with tokenizer.json "
                             "(and `pip install tokenizers`), or give prompt_token_ids")
        if not isinstance(item["prompt"], str):
            raise ValueError(f"prompt must be a string, got {item['prompt']!r}")
        tokens = tokenizer.encode(item["prompt"]).ids
    else:
        raise ValueError("give prompt_token_ids (or prompt)")
    request_id = item.get("id", number)
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise ValueError(f"id must be a string or a number, got {request_id!r}")
    fields = {k: item[k] for k in SAMPLING_FIELDS if k in item}  # the engine validates their values
    try:
        params = SamplingParams(**fields)
    except TypeError as error:
        raise ValueError(str(error)) from None
    return Request(prompt_token_ids=tokens, params=params, request_id=str(request_id))


def _prompt_lines(path: str, out) -> list[tuple[int, str]] | int:
    """The prompts file's (line number, text) of every non-blank line, or the exit code of a
    usage error when it cannot be read, is not UTF-8 text or holds no request."""
    help = 'one JSON object per line, e.g. {"prompt_token_ids": [1, 2, 3], "max_tokens": 16}'
    file = Path(path)
    if not file.is_file():
        state = "is a directory" if file.is_dir() else "does not exist"
        return out.usage_error(f"`{path}` {state}", "give the path of a prompts file: " + help)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        return out.usage_error(f"`{path}` is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                               f"{error.start})", "give a prompts file: " + help)
    except OSError as error:
        return out.usage_error(f"cannot read `{path}`: {error.strerror or error}")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return out.usage_error(f"`{path}` holds no request", "give a prompts file: " + help)
    return lines


def _prompts(args, lines: list[tuple[int, str]], engine) -> int:
    tokenizer = _tokenizer(args.weights)
    requests, failed = [], 0
    for number, line in lines:
        try:
            requests.append(_request(line, number, tokenizer))
        except ValueError as error:
            failed += 1
            print(json.dumps({"id": str(number), "error": f"{args.prompts}:{number}: {error}"}))
    for output in engine.generate(requests):
        line = {"id": output.request_id, "output_token_ids": output.output_token_ids,
                "finish_reason": output.finish_reason}
        if tokenizer is not None and output.output_token_ids:
            line["text"] = tokenizer.decode(output.output_token_ids)
        if output.error:
            failed += 1
            line["error"] = output.error
        if output.ttft_s is not None:
            line["ttft_ms"] = round(output.ttft_s * 1e3, 3)
        if output.tpot_s is not None:
            line["tpot_ms"] = round(output.tpot_s * 1e3, 3)
        print(json.dumps(line))
    sys.stderr.write(f"ran {len(requests)} requests" + (f", {failed} failed" if failed else "") + "\n")
    return EXIT_INVALID if failed else EXIT_OK


# ----------------------------------------------------------------------------------- replay


def _replay(args, engine, out) -> int:
    from flowc.compiler.model.instance import simulate_plan_deployment, simulate_plan_instance
    from flowc.plan_io import read_spec
    from flowc.replay import replay_report, replay_requests
    from flowc.runtime.disagg import DisaggregatedEngine
    from flowc.runtime.replicas import ReplicatedEngine

    plan, dp = engine.plan_document, engine.plan
    checked = read_spec(plan, args.plan, args.against, out, why="a replay samples the spec's workload",
                        allow_outside=args.allow_outside)
    if isinstance(checked, int):
        return checked
    spec = checked.spec
    if dp.name not in spec.deployments:
        return out.usage_error(f"the spec has no deployment `{dp.name}`", "give the plan's spec with --against")
    workload = spec.workloads[spec.deployments[dp.name].workload]
    requests, sampled = replay_requests(workload, args.requests, engine.config.vocab, args.seed,
                                        engine.config.max_context)
    outputs = engine.generate(requests, replay=True, time_scale=args.time_scale)
    scaled = sampled.scaled(1 / args.time_scale)
    if isinstance(engine, DisaggregatedEngine):  # every instance runs, behind the engine's round robin
        predicted = simulate_plan_deployment(spec, dp, scaled, router="round_robin")
    elif isinstance(engine, ReplicatedEngine):  # every instance runs, behind the plan's own router
        predicted = simulate_plan_deployment(spec, dp, scaled)
    else:
        predicted = simulate_plan_instance(spec, dp, dp.groups.index(engine.group), scaled)
    report = replay_report(outputs, predicted, dp.instance_labels())
    if out.json:
        print(json.dumps(report, indent=2))
    else:
        print_replay(report, args, dp.name)
    return EXIT_OK if not report["errors"] else EXIT_INVALID


def print_replay(report: dict, args, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"replay of `{name}`: {report['requests']} requests, arrivals x {args.time_scale:g}")
    for column in ("metric", "measured", "predicted", "measured / predicted"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for metric in ("ttft_ms", "tpot_ms"):
        for stat in ("mean", "p50", "p90"):
            m, p = report[metric]["measured"].get(stat), report[metric]["predicted"][stat]
            table.add_row(f"{metric[:4].upper()} {stat} (ms)", f"{m:,.2f}" if m is not None else "-", f"{p:,.2f}",
                          f"{m / p:.2f}" if m is not None and p > 0 else "-")
    tput = report["output_tokens_per_s"]
    table.add_row("output tok/s", f"{tput['measured']:,.1f}", f"{tput['predicted']:,.1f}",
                  f"{tput['measured'] / tput['predicted']:.2f}" if tput["predicted"] > 0 else "-")
    console = Console(no_color=bool(args.no_color))
    console.print(table)
    if "instances" in report:  # where each request was prefilled (TTFT) and decoded (TPOT)
        per = Table(title="per instance: p50 of what it serves")
        for column in ("instance", "requests", "metric", "measured (ms)", "predicted (ms)"):
            per.add_column(column, justify="left" if column in ("instance", "metric") else "right")
        for row in report["instances"]:
            m, p = row["measured_p50_ms"], row["predicted_p50_ms"]
            per.add_row(row["instance"], str(row["requests"]), row["metric"].upper(),
                        f"{m:,.2f}" if m is not None else "-", f"{p:,.2f}" if p is not None else "-")
        console.print(per)
    for error in report["errors"]:
        print(f"error: {escape_control(str(error))}", file=sys.stderr)
