"""`flowc autotune SPEC`: search a deployment's knobs (flowc/autotune.py) and print the trials
ranked, the Pareto frontier marked.

`--space KNOB=V1,V2` (repeatable) replaces the default space (what the spec leaves open);
values are whole numbers, dtypes, routers, or on/off for `disaggregation`. `-o FILE` writes
the result document (`AutotuneResult.to_json`, what `flowc viz --autotune` draws); `--json`
prints it instead of the table. Exit codes: 0 a configuration meets the SLO, 1 an invalid
spec or none meets it, 2 usage or I/O error, 130 interrupted (the trials done are printed).
"""

from __future__ import annotations

from pathlib import Path

from flowc.compiler.diagnostics import escape_control

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SWITCHES = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def add_arguments(parser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="a .flow file")
    parser.add_argument("--deployment", metavar="NAME", help="the deployment to tune (when the spec has several)")
    parser.add_argument("--space", action="append", default=[], metavar="KNOB=V1,V2",
                        help="values to try for one knob (repeat for more knobs; default: what the spec leaves open)")
    parser.add_argument("--budget", type=int, default=32, metavar="N", help="configurations to evaluate at most (32)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="worker processes (1)")
    parser.add_argument("--evaluator", choices=("simulate", "measure"), default="simulate",
                        help="predict with the simulator, or run each plan on this machine (simulate)")
    parser.add_argument("--objective", metavar="NAME", help="max_goodput_per_gpu, min_gpus, min_cost, min_ttft_p90 "
                        "or min_tpot_p90 (default: the deployment's)")
    parser.add_argument("--requests", type=int, default=16, metavar="N",
                        help="requests replayed per trial with --evaluator measure (16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of workloads and restarts (0)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where trials are cached (default ~/.cache/flowc/autotune)")
    parser.add_argument("-o", "--output", metavar="RESULTS.json", help="write the result document")


def parse_space(items: list[str]) -> dict:
    """`["tp=1,2", "disaggregation=off,on"]` -> {"tp": [1, 2], "disaggregation": [False, True]};
    ValueError says what is wrong with an item. Knob names are checked by the API."""
    from flowc.autotune import INT_KNOBS

    space: dict = {}
    for item in items:
        knob, sep, text = item.partition("=")
        knob = knob.strip()
        if not sep or not knob or not text.strip():
            raise ValueError(f"`--space {item}` is not KNOB=V1,V2 (e.g. `--space tp=1,2,4`)")
        words = [w.strip() for w in text.split(",")]
        if knob in INT_KNOBS:
            if not all(w.isdigit() for w in words):
                raise ValueError(f"`{knob}` values are whole numbers, not `{text}`")
            values = [int(w) for w in words]
        elif knob == "disaggregation":
            if not all(w.lower() in SWITCHES for w in words):
                raise ValueError(f"`disaggregation` values are on or off, not `{text}`")
            values = [SWITCHES[w.lower()] for w in words]
        else:
            values = words
        space[knob] = values
    return space


def cmd_autotune(args, out) -> int:
    from flowc.autotune import AutotuneError, autotune
    from flowc.compiler.diagnostics import FlowError
    from flowc.progress import progress

    if not Path(args.spec).is_file():
        state = "is a directory" if Path(args.spec).is_dir() else "does not exist"
        return out.usage_error(f"`{args.spec}` {state}", "give the path of a .flow file")
    try:
        space = parse_space(args.space) if args.space else None
    except ValueError as error:
        return out.usage_error(str(error))
    try:
        with progress("autotuning", enabled=not out.json, color=out.color) as bar:
            result = autotune(args.spec, space=space, objective=args.objective, budget=args.budget,
                              evaluator=args.evaluator, parallel=args.parallel, deployment=args.deployment,
                              cache_dir=args.cache_dir, on_progress=bar, seed=args.seed,
                              measure_requests=args.requests)
    except FlowError as error:
        out.diagnostics(error.diagnostics, error.sources)
        return EXIT_INVALID
    except AutotuneError as error:
        return out.usage_error(error.message, error.help)
    except OSError as error:  # the cache folder or a spec file
        return out.usage_error(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
    document = result.to_json()
    if args.output and (failed := out.write_file(args.output, document + "\n")) is not None:
        return failed
    if out.json:
        print(document)
    else:
        _print(result, out.color)
        if args.output:
            print(f"wrote {escape_control(args.output)}")
    if result.cancelled:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.best is not None else EXIT_INVALID


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _print(result, color: bool) -> None:
    from rich.table import Table

    from flowc.autotune import describe, value_text
    from flowc.console import make_console

    console = make_console(color=color)
    knobs = list(result.space)
    table = Table(title=f"autotuning `{result.deployment}` ({result.objective}, {result.evaluator}d)",
                  title_justify="left")
    for column in ("#", *knobs, "goodput/GPU", "TTFT p90 ms", "TPOT p90 ms", "GPUs", "SLO", "P", "instances"):
        table.add_column(column, justify="left" if column in ("instances", *knobs) else "right")
    for rank, t in enumerate(result.trials, 1):
        cells = [str(rank), *(value_text(t.config[k]) for k in knobs)]
        m = t.metrics
        if m is None:
            problem = t.problems[0] if t.problems else None
            note = f"{problem.code + ' ' if problem and problem.code else ''}{problem.message if problem else 'failed'}"
            table.add_row(*cells, "-", "-", "-", "-", "[red]failed[/]", "", note)
            continue
        slo = "[green]met[/]" if m.meets_slo else "[red]missed[/]"
        table.add_row(*cells, f"{_number(m.goodput_rps_per_gpu)} req/s", _number(m.ttft_p90_ms), _number(m.tpot_p90_ms),
                      str(m.gpus), slo, "[bold]*[/]" if t.pareto else "", m.summary)
    console.print(table)
    console.print("P: * on the Pareto frontier (no other trial meeting the SLO is as good on goodput per GPU, "
                  "p90 TTFT and p90 TPOT, and better on one)")
    best = result.best
    if best is not None:
        console.print(f"[bold]best[/]: {describe(best.config)}")
    else:
        console.print("[red]no configuration meets the SLO[/]")
    stopped = ", interrupted" if result.cancelled else ""
    console.print(f"{len(result.trials)} trials ({result.strategy}{stopped}): {result.evaluations} evaluated, "
                  f"{result.cached} from the cache, {result.elapsed_s:.1f} s")
