"""Autotune a deployment with the simulator: print the best configuration and the Pareto
frontier, and write an HTML report of the spec's plan with the frontier added.

    python examples/autotune.py [SPEC.flow] [REPORT.html]     (default: examples/tiny-cpu.flow)

Each trial compiles the spec with the knobs pinned to one configuration. Trials are cached in
~/.cache/flowc/autotune, so a second run prints at once. The command line does the same:
`flowc autotune SPEC --space max_seqs=4,8,16,32 -o results.json`, then
`flowc viz plan.json -o report.html --autotune results.json`.
"""

import sys
from pathlib import Path

import flowc
from flowc.api import check_sources
from flowc.compiler.render.html import render_report

spec_path = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("tiny-cpu.flow"))
report_path = sys.argv[2] if len(sys.argv) > 2 else "autotune-report.html"

# The knobs to try: the scheduler's token budget and how many sequences it runs at once.
# 12 configurations; a budget of 8 makes the search choose which to compile (coordinate descent).
space = {"max_batched_tokens": [256, 512, 1024], "max_seqs": [4, 8, 16, 32]}
result = flowc.autotune(spec_path, space=space, budget=8)
print(f"{len(result.trials)} trials ({result.strategy}): {result.evaluations} compiled, {result.cached} cached")

best = result.best
if best is None:
    sys.exit("no configuration meets the SLO")
print(f"best: {flowc.autotune.describe(best.config)}: {best.metrics.goodput_rps_per_gpu:,.0f} req/s per GPU")

print("Pareto frontier (goodput per GPU up, p90 TTFT and TPOT down):")
for trial in result.pareto:
    m = trial.metrics
    print(f"  {flowc.autotune.describe(trial.config)}: {m.goodput_rps_per_gpu:,.0f} req/s per GPU, "
          f"TTFT p90 {m.ttft_p90_ms:.2f} ms, TPOT p90 {m.tpot_p90_ms:.3f} ms")

# The report draws the plan of the spec as written; `autotune=` adds the trials and the frontier.
checked = check_sources(spec_path)
plan = flowc.compile(checked.spec)
sources = {name: source.text for name, source in checked.sources.items()}
Path(report_path).write_text(render_report(plan, checked.spec, sources=sources, autotune=result.to_dict()),
                             encoding="utf-8")
print(f"wrote {report_path}")
