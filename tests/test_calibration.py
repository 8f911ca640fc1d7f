"""The committed calibration (stdlib/calibration.json) against the measured data it was fitted on.

Tests that read the data skip when ../shared/calibration (beside the repo) is absent; the
structure and recorded-error checks always run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from flowc.compiler.model import operators as cost
from flowc.compiler.model.operators import calibration

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "calibration"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="no calibration data at ../shared/calibration")

TARGETS = {"gemm": 0.10, "attention_prefill": 0.10, "attention_decode": 0.10, "collectives": 0.15, "sendrecv": 0.15}
CALIBRATED = ("a100-sxm-80g", "h100-sxm", "h200-sxm", "l40s", "b200")
# Fits whose held-out median misses its target, with why; each must stay under its ceiling.
KNOWN_MISSES = {
    ("a100-sxm-80g", "attention_decode", "bf16"): (0.15, "flash-attn split-KV switches: +40% steps at 256 keys"),
    ("l40s", "gemm", "fp8"): (0.15, "noisy L40S timings (power-capped card, warm 96 MB L2)"),
    ("l40s", "attention_prefill", "bf16"): (0.15, "noisy L40S timings, a cliff at 8192 batch tokens"),
    ("l40s", "attention_prefill", "fp8"): (0.50, "FlashInfer fp8 on L40S: per-token cliff past 8192 tokens, "
                                                 "timings not monotone in sequence length"),
    ("l40s", "attention_decode", "bf16"): (0.25, "noisy L40S timings, kernel switches"),
    ("b200", "attention_prefill", "fp8"): (0.15, "FlashInfer TRT-LLM fp8 kernels vary with head_dim beyond the form"),
    ("a100-sxm-80g", "collectives", "infiniband allreduce 16"): (0.20, "hierarchical 2-node all-reduce (vidur)"),
}


def load_calibrate():
    pytest.importorskip("numpy")
    pytest.importorskip("pandas")
    spec = importlib.util.spec_from_file_location("calibrate", REPO / "tools" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_fits(cal):
    """(gpu, family, case, fit, source) for every primary fit with a recorded error."""
    for gpu, entry in cal["gpus"].items():
        for family in ("gemm", "attention_prefill", "attention_decode"):
            for case, fit in entry.get(family, {}).items():
                yield gpu, family, case, fit, fit["source"]
        for kind, coll in entry.get("collectives", {}).items():
            for op in cost.COLLECTIVE_OPS:
                for n, fit in coll.get(op, {}).items():
                    yield gpu, "collectives", f"{kind} {op} {n}", fit, coll["source"]
        for kind, fit in entry.get("sendrecv", {}).items():
            yield gpu, "sendrecv", kind, fit, fit["source"]


# ------------------------------------------------------------------------------ always


def test_calibration_file_covers_the_stdlib_gpus_with_sources():
    cal = calibration()
    assert cal["format"] == 1 and set(cal["gpus"]) == set(CALIBRATED)
    for gpu in CALIBRATED:
        entry = cal["gpus"][gpu]
        assert entry["gemm"]["bf16"] and entry["attention_prefill"]["bf16"] and entry["attention_decode"]["bf16"]
        assert entry["collectives"] and set(entry["elementwise"]) == set(cost.ELEMENTWISE_OPS)
    for gpu, family, case, fit, source in all_fits(cal):
        assert source in cal["sources"], (gpu, family, case)
        assert set(fit["error"]) >= {"median", "p90", "n"} and fit["error"]["n"] > 0
    for source in cal["sources"].values():
        assert source["project"] in ("ai-dynamo/aiconfigurator", "microsoft/vidur")
        assert source["license"] in ("Apache-2.0", "MIT") and source["software"] and source["files"]
    # small and readable: a few KB per GPU
    assert len(json.dumps(cal)) < 12_000 * len(CALIBRATED)


def test_recorded_errors_meet_the_targets():
    cal = calibration()
    misses = []
    for gpu, family, case, fit, _ in all_fits(cal):
        median = fit["error"]["median"]
        known = KNOWN_MISSES.get((gpu, family, case))
        if known:
            assert median < known[0], (gpu, family, case, median)
        elif median >= TARGETS[family]:
            misses.append((gpu, family, case, median))
    assert not misses


def test_uncalibrated_gpus_say_where_their_curves_come_from():
    from flowc.stdlib_listing import stdlib_spec

    std = stdlib_spec()
    for name in ("mi300x", "gh200", "h100-pcie", "a100-sxm-40g"):
        ops = cost.operators(std.gpus[name])
        assert not ops.calibrated and ops.base_name in CALIBRATED
        assert ops.base_name in ops.calibration_source
    assert cost.operators(std.gpus["cpu-local"]).base_name is None


# ------------------------------------------------------------------------------ with the data


@pytest.fixture(scope="module")
def calib():
    return load_calibrate()


@pytest.fixture(scope="module")
def h100(calib):
    from flowc.stdlib_listing import stdlib_spec

    return stdlib_spec().gpus["h100-sxm"]


def heldout_median(pred, params, X, t, test):
    import numpy as np

    sub = {k: (v[test] if isinstance(v, np.ndarray) else v) for k, v in X.items()}
    return float(np.median(np.abs(pred(params, sub) / t[test] - 1)))


@needs_data
def test_h100_heldout_errors_reproduce_and_meet_targets(calib, h100):
    import pandas as pd

    entry = calibration()["gpus"]["h100-sxm"]
    gemm = pd.read_csv(DATA / "aic_h100_sxm_vllm_gemm_perf.csv.gz")
    for dtype, name in (("bfloat16", "bf16"), ("fp8", "fp8")):
        X, t, test, _ = calib.gemm_data(gemm, dtype, h100, "aic_h100_sxm_vllm_gemm_perf.csv.gz")
        fit = entry["gemm"][name]
        median = heldout_median(calib.gemm_pred, fit["params"], X, t, test)
        assert median < TARGETS["gemm"]
        assert abs(median - fit["error"]["median"]) < 1e-3
    for phase, loader, pred in (("context", calib.prefill_data, calib.prefill_pred),
                                ("generation", calib.decode_data, calib.decode_pred)):
        fname = f"aic_h100_sxm_vllm_{phase}_attention_perf.csv.gz"
        df = pd.read_csv(DATA / fname)
        family = "attention_prefill" if phase == "context" else "attention_decode"
        for kv_dtype, name in (("bfloat16", "bf16"), ("fp8", "fp8")):
            X, t, test, _ = loader(df, kv_dtype, None, h100, fname)
            fit = entry[family][name]
            median = heldout_median(pred, fit["params"], X, t, test)
            assert median < TARGETS[family]
            assert abs(median - fit["error"]["median"]) < 1e-3


@needs_data
def test_h100_allreduce_heldout(calib, h100):
    import numpy as np
    import pandas as pd

    df = pd.read_csv(DATA / "aic_h100_sxm_nccl.csv")
    coll = calibration()["gpus"]["h100-sxm"]["collectives"]["nvlink"]
    apes = []
    for n in (2, 4, 8):
        d = df[(df.op_name == "all_reduce") & (df.num_gpus == n)]
        nbytes = d.message_size.to_numpy(float) * d.nccl_dtype.map(calib.NCCL_DTYPE_BYTES).to_numpy(float)
        test = calib._keys(d, ["op_name", "num_gpus", "nccl_dtype", "message_size"], "aic_h100_sxm_nccl.csv")
        X = {"S": nbytes * 2 * (n - 1) / n, "bw": coll["link_bandwidth"]}
        t = d.latency.to_numpy(float) * 1e-3
        pred = calib.collective_pred(coll["allreduce"][str(n)]["params"], {"S": X["S"][test], "bw": X["bw"]})
        apes.append(np.abs(pred / t[test] - 1))
    assert float(np.median(np.concatenate(apes))) < TARGETS["collectives"]


@needs_data
def test_cost_model_evaluates_the_same_forms_as_the_fit(calib, h100):
    """compiler/model/cost.py (pure Python) and tools/calibrate.py (numpy) compute the same curves."""
    import numpy as np
    import pandas as pd

    entry = calibration()["gpus"]["h100-sxm"]
    rng = random.Random(0)
    gemm = pd.read_csv(DATA / "aic_h100_sxm_vllm_gemm_perf.csv.gz")
    X, t, test, _ = calib.gemm_data(gemm, "bfloat16", h100, "x")
    c = entry["gemm"]["bf16"]["params"]
    numpy_side = calib.gemm_pred(c, X, warm_l2=False)
    for i in rng.sample(range(len(t)), 200):
        scalar = cost.gemm_curve(c, X["m"][i], X["n"][i], X["k"][i], X["F"][i], X["B"][i], X["peak"], X["bw"])
        assert math.isclose(scalar, numpy_side[i], rel_tol=1e-9)
    # and Operators.gemm_time is that curve at the vLLM bf16 counts
    ops = cost.operators(h100)
    i = int(np.flatnonzero(test)[0])
    assert math.isclose(ops.gemm_time(X["m"][i], X["n"][i], X["k"][i], "bf16"), numpy_side[i], rel_tol=1e-9)

    fname = "aic_h100_sxm_vllm_context_attention_perf.csv.gz"
    X, t, _, _ = calib.prefill_data(pd.read_csv(DATA / fname), "bfloat16", None, h100, fname)
    c = entry["attention_prefill"]["bf16"]["params"]
    numpy_side = calib.prefill_pred(c, X)
    for i in rng.sample(range(len(t)), 200):
        scalar = c["t0"] + cost.prefill_body(c, X["q"][i], X["pairs"][i], X["h"][i], X["kv"][i], X["dqk"][i],
                                             X["dv"][i], X["kvb"], X["peak"], X["bw"])
        assert math.isclose(scalar, numpy_side[i], rel_tol=1e-9)

    fname = "aic_h100_sxm_vllm_generation_attention_perf.csv.gz"
    df = pd.read_csv(DATA / fname)
    X, t, _, d = calib.decode_data(df, "fp8", None, h100, fname)
    c = entry["attention_decode"]["fp8"]["params"]
    numpy_side = calib.decode_pred(c, X)
    for i in rng.sample(range(len(t)), 200):
        scalar = c["t0"] + cost.decode_body(c, X["units"][i], X["F"][i], X["B"][i], X["peak"], X["bw"])
        assert math.isclose(scalar, numpy_side[i], rel_tol=1e-9)
        row = d.iloc[i]
        via_api = ops.attention_decode_time(int(row.batch_size), int(row.batch_size * (row.step + 1)),
                                            int(row.num_heads), int(row.num_key_value_heads), int(row.head_dim), "fp8")
        assert math.isclose(via_api, numpy_side[i], rel_tol=1e-9)

    coll = entry["collectives"]["nvlink"]["allreduce"]["8"]["params"]
    for nbytes in (1e3, 1e6, 1e9):
        S = nbytes * 2 * 7 / 8
        assert math.isclose(cost.collective_curve(coll, S, 450e9, cap=False),
                            float(calib.collective_pred(coll, {"S": np.array([S]), "bw": 450e9})[0]), rel_tol=1e-9)


@pytest.mark.slow  # refits every H100 family: ~40 s
@needs_data
def test_committed_json_is_what_the_script_writes_for_h100(calib):
    result = calib.Calibrator(DATA, verbose=False).run(["h100-sxm"])
    committed = calibration()
    fresh, old = result["gpus"]["h100-sxm"], committed["gpus"]["h100-sxm"]
    assert fresh.keys() == old.keys()
    fresh_fits = {(f, c): (fit, s) for _, f, c, fit, s in all_fits(result)}
    old_fits = {(f, c): (fit, s) for g, f, c, fit, s in all_fits(committed) if g == "h100-sxm"}
    assert fresh_fits.keys() == old_fits.keys()
    for key, (fit, source) in fresh_fits.items():
        assert source == old_fits[key][1]
        assert abs(fit["error"]["median"] - old_fits[key][0]["error"]["median"]) < 0.005, key
        assert result["sources"][source] == committed["sources"][source]
