"""`flowc stdlib`: the standard library's GPUs and models with their key numbers."""

from __future__ import annotations

import json

from flowc.compiler.frontend.library import stdlib_spec
from flowc.compiler.model.geometry import kv_bytes_per_token, param_counts, weight_bytes
from flowc.compiler.spec import Spec


def _gpu_rows(spec: Spec) -> list[dict]:
    return [{
        "name": g.name, "memory_GiB": round(g.memory / 2**30, 1), "memory_bandwidth_TB_s": g.memory_bandwidth / 1e12,
        "bf16_TFLOP_s": g.flops.get("bf16", 0) / 1e12, "fp8_TFLOP_s": g.flops.get("fp8", 0) / 1e12,
        "interconnect": g.interconnect, "interconnect_GB_s": spec.links[g.interconnect].bandwidth / 1e9,
        "doc": g.doc or "",
    } for g in spec.gpus.values()]


def _model_rows(spec: Spec) -> list[dict]:
    rows = []
    for m in spec.models.values():
        counts = param_counts(m)
        rows.append({
            "name": m.name, "architecture": m.architecture, "params_B": round(counts.total / 1e9, 2),
            "active_params_B": round(counts.active(m) / 1e9, 2), "layers": m.layers, "hidden": m.hidden,
            "heads": m.heads, "kv_heads": m.kv_heads, "experts": f"{m.moe.top_k}/{m.moe.experts}" if m.moe else "",
            "max_context": m.max_context, "weights": m.weights, "weights_GB": round(weight_bytes(m) / 1e9, 1),
            "kv_KiB_per_token": round(kv_bytes_per_token(m) / 1024, 1), "doc": m.doc or "",
        })
    return rows


def stdlib_listing(*, as_json: bool, color: bool) -> None:
    spec = stdlib_spec()
    gpus, models = _gpu_rows(spec), _model_rows(spec)
    if as_json:
        print(json.dumps({"gpus": gpus, "models": models, "slos": sorted(spec.slos), "links": sorted(spec.links)},
                         indent=2))
        return
    from rich.table import Table

    from flowc.console import make_console

    console = make_console(color)
    table = Table(title="GPUs (use std.gpus)", title_justify="left")
    for column in ("name", "memory", "HBM BW", "bf16", "fp8", "interconnect"):
        table.add_column(column, justify="left" if column in ("name", "interconnect") else "right")
    def tflops(value: float) -> str:
        return "-" if not value else f"{value:.0f} TFLOP/s" if value >= 10 else f"{value:.2g} TFLOP/s"

    for g in gpus:
        table.add_row(g["name"], f"{g['memory_GiB']:g} GiB", f"{g['memory_bandwidth_TB_s']:.2f} TB/s",
                      tflops(g["bf16_TFLOP_s"]), tflops(g["fp8_TFLOP_s"]),
                      f"{g['interconnect']} ({g['interconnect_GB_s']:.0f} GB/s)")
    console.print(table)
    table = Table(title="Models (use std.models)", title_justify="left")
    for column in ("name", "params", "active", "layers", "hidden", "heads/kv", "experts", "context", "weights",
                   "KV/token"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for m in models:
        table.add_row(m["name"], f"{m['params_B']:g} B", f"{m['active_params_B']:g} B", str(m["layers"]),
                      str(m["hidden"]), f"{m['heads']}/{m['kv_heads']}", m["experts"] or "-", f"{m['max_context']:,}",
                      f"{m['weights']} {m['weights_GB']:g} GB", f"{m['kv_KiB_per_token']:g} KiB")
    console.print(table)
    console.print("SLO presets (use std.slos): " + ", ".join(sorted(spec.slos)))
    console.print("Links (use std.links): " + ", ".join(sorted(spec.links)))
