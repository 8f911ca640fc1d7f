"""Serving-benchmark results: what vLLM's and SGLang's serving benchmarks measured, read into
`BenchmarkRun`s for `flowc calibrate --from-benchmark` (the fit is in model/benchmark_fit.py).

Two file shapes:
- vLLM's `benchmarks/benchmark_serving.py --save-result` (also `vllm bench serve
  --save-result`): one JSON object per file, with `backend`, `model_id`, `num_prompts`,
  `request_rate` (a number, or the string "inf"), `burstiness`, `max_concurrency`,
  `duration`, `completed`, `total_input_tokens`, `total_output_tokens`, `request_throughput`,
  `output_throughput`, `mean|median|std|pNN_{ttft,tpot,itl,e2el}_ms` (the metrics the run
  selected: TTFT, TPOT and ITL by default) and, in older versions or with `--save-detailed`,
  the per-request lists `input_lens`, `output_lens`, `ttfts`, `itls`;
- SGLang's `python -m sglang.bench_serving --output-file` (JSONL): one JSON object per line,
  each a run, with `backend`, `dataset_name`, `request_rate` (a number, or `Infinity`),
  `max_concurrency`, `duration`, `completed`, `total_input_tokens`, `total_output_tokens`,
  `request_throughput`, `output_throughput`, `mean|median_e2e_latency_ms`,
  `mean|median|p99_ttft_ms`, `median_tpot_ms` (newer versions), `median_itl_ms` and, with
  `--output-details`, `input_lens` and `output_lens`.

A run's engine is the server it measured: its `backend` when that names vLLM or SGLang (each
benchmark can drive the other's server), else the benchmark's own engine. Prompt and output
lengths are the successful requests' own (`input_lens`, `output_lens`) when the file has them,
else the means of the totals. Latencies are the medians, in seconds. A median of 0 or less is
what both benchmarks write when they measured nothing (TTFT without streaming): it counts as
missing.

Every problem with a file is one F0601 diagnostic naming the file (and the line of the field
where it can be found), the field and the fix; no value read from the file is ever shown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from flowc.compiler.diagnostics import Diagnostic, FlowError
from flowc.compiler.source import SourceFile

CODE = "F0601"
MAX_FILE_BYTES = 256 * 2**20  # a detailed result of 10,000 requests with their texts is a few tens of MB
MAX_DIAGNOSTICS_PER_FILE = 10
MAX_RUNS_PER_FILE = 1000

Tool = Literal["vllm", "sglang"]
TOOL_NAMES = {"vllm": "vLLM's serving benchmark", "sglang": "SGLang's bench_serving"}
TOOL_FIX = {"vllm": "re-run `vllm bench serve ... --save-result` (or benchmarks/benchmark_serving.py "
                    "--save-result) and pass the JSON file it writes",
            "sglang": "re-run `python -m sglang.bench_serving ... --output-file FILE.jsonl` and pass that file"}
# keys only one of the two benchmarks writes
VLLM_KEYS = ("model_id", "tokenizer_id", "num_prompts", "burstiness", "date", "median_e2el_ms", "request_goodput",
             "total_token_throughput")
SGLANG_KEYS = ("median_e2e_latency_ms", "total_output_tokens_retokenized", "dataset_name", "random_input_len",
               "input_throughput", "accept_length")
# keys that make an object a serving-benchmark result at all
RESULT_KEYS = ("completed", "duration", "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "output_throughput")
# measured medians: metric -> field in each shape
MEDIANS = {"vllm": {"ttft": "median_ttft_ms", "tpot": "median_tpot_ms", "itl": "median_itl_ms",
                    "e2e": "median_e2el_ms"},
           "sglang": {"ttft": "median_ttft_ms", "tpot": "median_tpot_ms", "itl": "median_itl_ms",
                      "e2e": "median_e2e_latency_ms"}}
METRIC_NAMES = {"ttft": "TTFT p50", "tpot": "TPOT p50", "itl": "ITL p50", "e2e": "E2E p50",
                "throughput": "output tok/s"}


@dataclass(frozen=True)
class BenchmarkRun:
    """One measured serving run. Times are seconds, throughputs per second."""

    file: str  # the path as given
    run: int  # 1-based index of the run in its file
    line: int  # the file's line where the run starts
    tool: Tool  # the benchmark that wrote it (the file's shape)
    engine: str  # the engine it measured (model/engines.py names)
    rate: Optional[float]  # requests/s of the arrivals; None: every request at once ("inf")
    burstiness: float  # shape of the gamma inter-arrival times (1: Poisson)
    concurrency: Optional[int]  # the client's cap on requests in flight (None: no cap)
    completed: int
    duration: float
    prompt_lens: tuple[int, ...]  # per successful request, or the one mean when `per_request` is False
    output_lens: tuple[int, ...]
    per_request: bool
    ttft: Optional[float] = None  # medians, seconds
    tpot: Optional[float] = None
    itl: Optional[float] = None
    e2e: Optional[float] = None
    output_throughput: Optional[float] = None  # output tokens/s
    request_throughput: Optional[float] = None  # requests/s

    def measured(self) -> dict[str, float]:
        """The figures measured, by metric ("ttft", "tpot", "itl", "e2e", "throughput")."""
        values = {"ttft": self.ttft, "tpot": self.tpot, "itl": self.itl, "e2e": self.e2e,
                  "throughput": self.output_throughput}
        return {metric: value for metric, value in values.items() if value is not None}

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_lens) / len(self.prompt_lens)

    @property
    def mean_output(self) -> float:
        return sum(self.output_lens) / len(self.output_lens)

    def load(self) -> str:
        """The offered load, in words: "rate 4 req/s", "concurrency 16", "rate inf"."""
        parts = []
        if self.rate is not None:
            parts.append(f"rate {self.rate:g} req/s" + (f" (burstiness {self.burstiness:g})"
                                                         if self.burstiness != 1 else ""))
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        return ", ".join(parts) or "rate inf"


class _Problems:
    """The diagnostics of one file; positions are found in its text, which is never shown."""

    def __init__(self, name: str, text: str):
        self.name = name
        self.source = SourceFile(name, text)
        self.found: list[Diagnostic] = []

    def add(self, message: str, help: str, *, at: int = 0, end: Optional[int] = None,
            notes: tuple[str, ...] = ()) -> None:
        if len(self.found) < MAX_DIAGNOSTICS_PER_FILE:
            at = max(0, min(at, len(self.source.text)))
            span = self.source.span(at, at if end is None else max(at, min(end, len(self.source.text))))
            self.found.append(Diagnostic(CODE, message, span=span, help=help, notes=notes))


class _Run:
    """Reads the fields of one JSON object (a run) and reports what is wrong with them."""

    def __init__(self, problems: _Problems, doc: dict, start: int, end: int, index: int, runs: int):
        self.p, self.doc, self.start, self.end = problems, doc, start, end
        self.note = (f"run {index} of {runs} in the file",) if runs > 1 else ()
        self.tool: Tool = "sglang" if any(k in doc for k in SGLANG_KEYS) else "vllm"

    def _at(self, field: str) -> tuple[int, Optional[int]]:
        """Where `"field":` is written in the run's text (its start when it is not there)."""
        match = re.compile(r'"' + re.escape(field) + r'"\s*:').search(self.p.source.text, self.start, self.end)
        return (match.start(), match.start() + len(field) + 2) if match else (self.start, None)

    def problem(self, field: Optional[str], message: str, help: str) -> None:
        at, end = self._at(field) if field else (self.start, None)
        self.p.add(message, help, at=at, end=end, notes=self.note)

    def missing(self, field: str, why: str = "") -> None:
        self.problem(None, f"the benchmark result has no `{field}`{why}",
                     f"{TOOL_FIX[self.tool]}; the file must hold the benchmark's own output, unedited")

    def number(self, field: str, *, required: bool = False, positive: bool = False,
               whole: bool = False) -> Optional[float]:
        """A finite number (None when absent or null: missing, which `required` reports)."""
        value = self.doc.get(field)
        if value is None:
            if required:
                self.missing(field)
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(field, f"`{field}` is not a number", f"{TOOL_FIX[self.tool]}; `{field}` holds a number")
            return None
        if not math.isfinite(value):
            self.problem(field, f"`{field}` is not a finite number (NaN or infinite)",
                         "the run that wrote it measured nothing usable: check the server log, fix the "
                         "server or the benchmark's arguments, and run the benchmark again")
            return None
        if value < 0 or (positive and value == 0) or (whole and value != int(value)):
            kind = "a whole number" if whole else "a number"
            self.problem(field, f"`{field}` is not {kind} {'above' if positive else 'of at least'} 0",
                         f"{TOOL_FIX[self.tool]}; the file must hold the benchmark's own output, unedited")
            return None
        return float(value)

    def rate(self) -> tuple[bool, Optional[float]]:
        """(read, requests/s or None for "inf")."""
        value = self.doc.get("request_rate")
        if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
            return True, None
        if isinstance(value, float) and value == math.inf:  # SGLang writes float("inf") as Infinity
            return True, None
        if value is None:
            self.missing("request_rate", " (the arrival rate the run offered)")
            return False, None
        rate = self.number("request_rate", positive=True)
        return rate is not None, rate

    def lengths(self, completed: int) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The successful requests' (prompt, output) lengths from `input_lens` and `output_lens`,
        or None when the file does not have both (or no request in them has an output)."""
        lists = {}
        for field in ("input_lens", "output_lens"):
            value = self.doc.get(field)
            if value is None:
                return None
            if not isinstance(value, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                    and x == int(x) for x in value):
                self.problem(field, f"`{field}` is not a list of token counts",
                             f"{TOOL_FIX[self.tool]}; or delete the field (the totals give the mean lengths)")
                return None
            lists[field] = value
        prompts, outputs = lists["input_lens"], lists["output_lens"]
        if len(prompts) != len(outputs):
            self.problem("output_lens", "`input_lens` and `output_lens` have different lengths",
                         f"{TOOL_FIX[self.tool]}; or delete both fields (the totals give the mean lengths)")
            return None
        pairs = [(max(1, int(p)), int(o)) for p, o in zip(prompts, outputs) if o >= 1]  # failed requests: 0
        if not pairs:
            return None
        return tuple(p for p, _ in pairs), tuple(o for _, o in pairs)


def _engine(backend: Any, tool: Tool) -> str:
    name = backend.lower() if isinstance(backend, str) else ""
    for engine in ("sglang", "vllm"):
        if engine in name:
            return engine
    return tool


def _read_run(problems: _Problems, doc: Any, start: int, end: int, index: int, runs: int) -> Optional[BenchmarkRun]:
    if not isinstance(doc, dict) or not any(key in doc for key in RESULT_KEYS):
        r = _Run(problems, {}, start, end, index, runs)
        r.problem(None, "not a serving-benchmark result: no `completed`, `duration` or measured latencies",
                  "pass the JSON file of `vllm bench serve --save-result` (or vLLM's benchmarks/"
                  "benchmark_serving.py --save-result) or the JSONL file of `python -m sglang.bench_serving "
                  "--output-file`")
        return None
    r = _Run(problems, doc, start, end, index, runs)
    before = len(problems.found)
    completed = r.number("completed", required=True, whole=True)
    duration = r.number("duration", required=True, positive=True)
    total_in = r.number("total_input_tokens", required=True, whole=True)
    total_out = r.number("total_output_tokens", required=True, whole=True)
    rate_read, rate = r.rate()
    concurrency = r.number("max_concurrency", positive=True, whole=True)
    burstiness = r.number("burstiness", positive=True)
    medians = {metric: r.number(field) for metric, field in MEDIANS[r.tool].items()}
    throughput = r.number("output_throughput")
    request_throughput = r.number("request_throughput")
    if len(problems.found) > before or not rate_read or None in (completed, duration, total_in, total_out):
        return None
    assert completed is not None and duration is not None and total_in is not None and total_out is not None
    if completed == 0:
        r.problem("completed", "the run completed no request (`completed` is 0)",
                  "every request failed: check the server log and the benchmark's arguments (model name, "
                  "endpoint, lengths within the model's context), fix them and run the benchmark again")
        return None
    if total_out < 1:
        r.problem("total_output_tokens", "the run generated no token (`total_output_tokens` is 0)",
                  "run the benchmark again with outputs of at least one token")
        return None
    # zero medians are what the benchmarks write when they measured nothing (no streaming)
    measured = {metric: value / 1e3 for metric, value in medians.items() if value}
    if not measured and not throughput:
        r.problem(None, "the run has no measured median TTFT, TPOT or ITL, nor an `output_throughput`",
                  f"{TOOL_FIX[r.tool]}; measure with a streaming endpoint so that the latencies are recorded")
        return None
    lengths = r.lengths(int(completed))
    if len(problems.found) > before:
        return None
    if lengths is None:
        prompts: tuple[int, ...] = (max(1, round(total_in / completed)),)
        outputs: tuple[int, ...] = (max(1, round(total_out / completed)),)
    else:
        prompts, outputs = lengths
    return BenchmarkRun(
        file=problems.name, run=index, line=problems.source.position(start)[0], tool=r.tool,
        engine=_engine(doc.get("backend"), r.tool), rate=rate, burstiness=burstiness or 1.0,
        concurrency=None if concurrency is None else int(concurrency), completed=int(completed), duration=duration,
        prompt_lens=prompts, output_lens=outputs, per_request=lengths is not None,
        ttft=measured.get("ttft"), tpot=measured.get("tpot"), itl=measured.get("itl"), e2e=measured.get("e2e"),
        output_throughput=throughput or None, request_throughput=request_throughput or None)


def _documents(problems: _Problems) -> list[tuple[Any, int, int]]:
    """The file's JSON objects as (object, start offset, end offset): the whole file (one JSON
    document; a list holds one run per item), else one per non-empty line (JSONL)."""
    text = problems.source.text
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        lines = [(m.start(), m.end()) for m in re.finditer(r"[^\n]+", text) if m.group().strip()]
        if len(lines) <= 1:
            problems.add(f"not JSON: {error.msg.lower()}", "pass the benchmark's own result file, unedited "
                         "(a JSON object, or one JSON object per line)", at=error.pos)
            return []
        found = []
        for start, end in lines:
            try:
                found.append((json.loads(text[start:end]), start, end))
            except json.JSONDecodeError as line_error:
                problems.add(f"not JSON Lines: this line is not a JSON object ({line_error.msg.lower()})",
                             "pass the benchmark's own result file, unedited: a JSON object, or one JSON "
                             "object per line", at=start + line_error.pos)
                return []
        return found
    except RecursionError:
        problems.add("not a benchmark result: JSON nested too deeply", "pass the benchmark's own result file")
        return []
    if isinstance(whole, list) and whole and all(isinstance(item, dict) for item in whole):
        return [(item, 0, len(text)) for item in whole]
    return [(whole, 0, len(text))]


def read_benchmark(path: str | Path) -> list[BenchmarkRun]:
    """The runs of one result file. Raises FlowError (F0601) for a file that is not a
    benchmark result or a run in it that cannot be used; OSError when it cannot be read."""
    name = str(path)
    with open(path, "rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        problems = _Problems(name, "")
        problems.add(f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB",
                     "pass the benchmark's result file, without the generated texts (vLLM: without "
                     "--save-detailed; SGLang: without --output-details)")
        raise FlowError(problems.found)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        problems = _Problems(name, "")
        problems.add(f"not a text file: the bytes at offset {error.start} are not UTF-8",
                     "pass the benchmark's own result file (JSON text)")
        raise FlowError(problems.found) from None
    problems = _Problems(name, text)
    if not text.strip():
        problems.add("the file is empty", "pass the file the benchmark wrote, after the run finished")
        raise FlowError(problems.found)
    documents = _documents(problems)
    if len(documents) > MAX_RUNS_PER_FILE:
        problems.add(f"the file holds {len(documents)} runs; at most {MAX_RUNS_PER_FILE} are read",
                     "pass the runs of the configuration to calibrate, in a file of their own")
    if problems.found:
        raise FlowError(problems.found)
    runs = [_read_run(problems, doc, start, end, index, len(documents))
            for index, (doc, start, end) in enumerate(documents, 1)]
    if problems.found:
        raise FlowError(problems.found)
    return [run for run in runs if run is not None]


def read_benchmarks(paths: Sequence[str | Path]) -> list[BenchmarkRun]:
    """The runs of every file, in order; one FlowError with the diagnostics of every file."""
    runs: list[BenchmarkRun] = []
    found: list[Diagnostic] = []
    for path in paths:
        try:
            runs += read_benchmark(path)
        except FlowError as error:
            found += error.diagnostics
    if found:
        raise FlowError(found)
    return runs
