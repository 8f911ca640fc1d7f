"""The committed calibration (stdlib/calibration.json) against the measured data it was fitted on.

Tests that read the data skip when ../shared/calibration (beside the repo) is absent; the
structure, recorded-error, kernel-set and form-agreement checks always run (the last need numpy
and pandas, to import tools/calibrate.py).
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
KERNEL_FAMILIES = ("gemm", "attention_prefill", "attention_decode")
# Other engines' kernel fits: engine -> GPUs that have them
ENGINE_FITS = {"trtllm": ("h100-sxm",)}
# Llama-3.1-8B's projections per layer, (n, k): qkv, o, gate+up, down
LLAMA8B_GEMMS = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
# Fits whose held-out median misses its target, with why; each must stay under its ceiling.
# Keys: (gpu, family, case); another engine's fits have the case "<dtype> [<engine>]" (see all_fits).
KNOWN_MISSES = {
    ("a100-sxm-80g", "attention_decode", "bf16"): (0.15, "flash-attn split-KV switches: +40% steps at 256 keys"),
    ("l40s", "gemm", "fp8"): (0.15, "L40S fp8 CUTLASS tile switches with m (m=8192 runs ~2x the curve for n <= 8192) "
                                    "that a smooth form cannot follow; power-capped card, warm 96 MB L2"),
    ("l40s", "attention_decode", "bf16"): (0.15, "flash-attn split-KV switches (+70% steps as the KV leaves the "
                                                 "96 MB L2); the warm-L2 term is fit-only"),
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
    """(gpu, family, case, fit, source) for every primary fit with a recorded error; another
    engine's kernel fits have the case "<dtype> [<engine>]"."""
    for gpu, entry in cal["gpus"].items():
        for family in KERNEL_FAMILIES:
            for case, fit in entry.get(family, {}).items():
                yield gpu, family, case, fit, fit["source"]
            for engine, fits in entry.get("engines", {}).items():
                for case, fit in fits.get(family, {}).items():
                    yield gpu, family, f"{case} [{engine}]", fit, fit["source"]
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


def test_engine_kernel_fits_are_keyed_by_their_own_source():
    cal = calibration()
    for engine, gpus in ENGINE_FITS.items():
        for gpu in CALIBRATED:
            entry = cal["gpus"][gpu]
            assert entry["kernels"] == cost.DEFAULT_KERNELS
            if gpu not in gpus:
                assert engine not in entry.get("engines", {})
                continue
            fits = entry["engines"][engine]
            assert set(fits) == set(KERNEL_FAMILIES)
            assert {"bf16", "fp8"} <= set(fits["gemm"]) and set(fits["attention_decode"]) == {"bf16", "fp8"}
            for family in KERNEL_FAMILIES:
                for case, fit in fits[family].items():
                    source = cal["sources"][fit["source"]]
                    # one software version per fit, never the default set's
                    assert fit["source"].startswith(f"aic:{engine}_")
                    assert fit["source"] != entry[family]["bf16"]["source"]
                    assert all(f.startswith(f"aic_{gpu.replace('-', '_')}_{engine}_") for f in source["files"])
                    assert fit["kernel"] and "+" not in fit["kernel"], (family, case)  # one kernel source
            # TRT-LLM's context attention with an fp8 cache: the FP8 FMHA, one of the table's two kernels
            assert fits["attention_prefill"]["fp8"]["attn_dtype"] == "fp8"


def test_operators_use_an_engines_kernels_only_when_asked():
    from flowc.stdlib_listing import stdlib_spec

    std = stdlib_spec()
    h100 = std.gpus["h100-sxm"]
    entry = calibration()["gpus"]["h100-sxm"]
    default, trt = cost.operators(h100), cost.operators(h100, "trtllm")
    assert default is cost.operators(h100) and trt is cost.operators(h100, "trtllm") and trt is not default
    for family in KERNEL_FAMILIES:
        assert default.fits[family] is entry[family] and default.kernels[family] == "vllm"
        assert trt.fits[family] is entry["engines"]["trtllm"][family] and trt.kernels[family] == "trtllm"
    # everything else is the GPU's own, whichever kernels
    assert trt.fits["collectives"] is entry["collectives"] and trt.fits["elementwise"] is entry["elementwise"]
    assert "TensorRT-LLM kernels" in trt.calibration_source and "vLLM kernels" in default.calibration_source
    assert trt.gemm_time(440, 4096, 4096, "fp8") != default.gemm_time(440, 4096, 4096, "fp8")
    # block-scaled fp8 (DeepSeek-style) runs TRT-LLM's fitted fp8_block GEMM; vLLM's table of it is excluded
    assert trt.gemm_mode("fp8", block_scaled=True).curve == "fp8_block"
    assert default.gemm_mode("fp8", block_scaled=True).curve == "fp8"
    # a GPU of the same silicon borrows h100-sxm's curves, TRT-LLM's included
    pcie = cost.operators(std.gpus["h100-pcie"], "trtllm")
    assert pcie.base_name == "h100-sxm" and set(pcie.kernels.values()) == {"trtllm"}


def test_a_gpu_without_an_engines_kernels_falls_back_to_vllms_and_says_so():
    from flowc.stdlib_listing import stdlib_spec

    std = stdlib_spec()
    for name in ("l40s", "a100-sxm-80g", "b200"):
        ops = cost.operators(std.gpus[name], "trtllm")
        vllm = cost.operators(std.gpus[name])
        assert set(ops.kernels.values()) == {"vllm"} and ops.requested_kernels == "trtllm"
        assert all(ops.fits[f] is vllm.fits[f] for f in KERNEL_FAMILIES)
        assert f"vLLM kernels (no trtllm kernel fits for {name})" in ops.calibration_source
        assert ops.gemm_time(512, 4096, 4096) == vllm.gemm_time(512, 4096, 4096)
    # an unknown kernel set is no error: the default set, said so
    ops = cost.operators(std.gpus["h100-sxm"], "sglang")
    assert set(ops.kernels.values()) == {"vllm"} and "no sglang kernel fits" in ops.calibration_source


def llama8b_gemm_seconds(ops, m, dtype):
    return sum(ops.gemm_time(m, n, k, dtype) for n, k in LLAMA8B_GEMMS)


def test_fp8_speeds_up_an_8b_decode_steps_gemms_with_trtllm_kernels():
    """At 440 decode rows, TRT-LLM's fp8 GEMMs beat bf16 on H100. vLLM's measured per-tensor fp8
    GEMMs (aiconfigurator's vLLM 0.14 collector) are slower than its bf16 ones at these shapes,
    and its fit says so: the engine's truth, checked against the rows in test_8b_gemms_against_the_tables."""
    from flowc.stdlib_listing import stdlib_spec

    h100 = stdlib_spec().gpus["h100-sxm"]
    trt, vllm = cost.operators(h100, "trtllm"), cost.operators(h100)
    assert llama8b_gemm_seconds(trt, 440, "fp8") < 0.85 * llama8b_gemm_seconds(trt, 440, "bf16")
    assert llama8b_gemm_seconds(vllm, 440, "fp8") > llama8b_gemm_seconds(vllm, 440, "bf16")
    # where the weights dominate (a few rows) fp8 is faster with either engine's kernels (TRT-LLM's
    # per-tensor fp8 linear has a ~12 us floor: quantization kernel and GEMM)
    for ops in (trt, vllm):
        assert llama8b_gemm_seconds(ops, 8, "fp8") < 0.9 * llama8b_gemm_seconds(ops, 8, "bf16")


def test_numpy_and_python_forms_agree_on_every_kernel_fit():
    """tools/calibrate.py's numpy forms and operators.py's pure-Python ones compute the same curve
    for every committed GEMM and attention fit (engines' included), on random shapes (no data needed)."""
    import numpy as np

    calib = load_calibrate()
    rng = np.random.default_rng(0)
    n = 64
    for gpu, family, case, fit, _ in all_fits(calibration()):
        if family not in KERNEL_FAMILIES:
            continue
        c = fit["params"]
        peak, bw = 1e15, 3e12
        if family == "gemm":
            m, nn, k = (2.0 ** rng.integers(0, 15, n) for _ in range(3))
            X = {"m": m, "n": nn, "k": k, "F": 2 * m * nn * k, "B": m * k + nn * k + 2 * m * nn, "peak": peak, "bw": bw}
            numpy_side = calib.gemm_pred(c, X, warm_l2=False)
            scalar = [cost.gemm_curve(c, m[i], nn[i], k[i], X["F"][i], X["B"][i], peak, bw) for i in range(n)]
        elif family == "attention_prefill":
            kv = 2.0 ** rng.integers(0, 4, n)
            h = kv * 2.0 ** rng.integers(0, 4, n)
            b, isl = 2.0 ** rng.integers(0, 6, n), 2.0 ** rng.integers(0, 14, n)
            d = 2.0 ** rng.integers(6, 9, n)
            X = {"q": b * isl, "pairs": b * isl * (isl + 1) / 2, "h": h, "kv": kv, "dqk": d, "dv": d, "kvb": 1.0,
                 "peak": peak, "bw": bw}
            numpy_side = calib.prefill_pred(c, X, warm_l2=False)
            scalar = [c["t0"] + cost.prefill_body(c, X["q"][i], X["pairs"][i], h[i], kv[i], d[i], d[i], 1.0, peak, bw)
                      for i in range(n)]
        else:
            seqs, keys = 2.0 ** rng.integers(0, 11, n), 2.0 ** rng.integers(0, 17, n)
            X = {"F": 4 * 32 * 128 * seqs * keys, "B": 2 * 8 * 128 * 2 * seqs * keys + 4 * 32 * 128 * seqs,
                 "units": seqs * 8, "peak": peak, "bw": bw}
            numpy_side = calib.decode_pred(c, X, warm_l2=False)
            scalar = [c["t0"] + cost.decode_body(c, X["units"][i], X["F"][i], X["B"][i], peak, bw) for i in range(n)]
        for i in range(n):
            assert math.isclose(scalar[i], numpy_side[i], rel_tol=1e-9), (gpu, family, case, i)


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


@pytest.mark.slow  # refits every H100 family, vLLM's and TRT-LLM's, with scipy: several minutes
@needs_data
def test_committed_json_is_what_the_script_writes_for_h100(calib):
    # the committed file is scipy's fits; the numpy fallback finds other parameters (of about
    # the same held-out error, but not within this test's 0.005)
    pytest.importorskip("scipy")
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


@needs_data
def test_h100_engine_fits_reproduce_their_recorded_heldout_errors(calib, h100):
    import pandas as pd

    engines = calibration()["gpus"]["h100-sxm"]["engines"]
    for engine, fits in engines.items():
        fname = f"aic_h100_sxm_{engine}_gemm_perf.csv.gz"
        gemm = pd.read_csv(DATA / fname)
        for name, fit in fits["gemm"].items():
            dtype = next(d for d, spec in calib.GEMM_DTYPES.items() if spec[0] == name)
            X, t, test, _ = calib.gemm_data(gemm, dtype, h100, fname)
            assert abs(heldout_median(calib.gemm_pred, fit["params"], X, t, test) - fit["error"]["median"]) < 1e-3
        for phase, family in (("context", "attention_prefill"), ("generation", "attention_decode")):
            fname = f"aic_h100_sxm_{engine}_{phase}_attention_perf.csv.gz"
            df = pd.read_csv(DATA / fname)
            for name, fit in fits[family].items():
                kv_dtype = next(d for d, spec in calib.KV_DTYPES.items() if spec[0] == name)
                rows = df.query(fit["rows"]) if "rows" in fit else df
                if family == "attention_prefill":
                    X, t, test, _ = calib.prefill_data(rows, kv_dtype, None, h100, fname, fit.get("attn_dtype"))
                    pred = calib.prefill_pred
                else:
                    X, t, test, _ = calib.decode_data(rows, kv_dtype, None, h100, fname)
                    pred = calib.decode_pred
                median = heldout_median(pred, fit["params"], X, t, test)
                assert abs(median - fit["error"]["median"]) < 1e-3, (engine, family, name)
                known = KNOWN_MISSES.get(("h100-sxm", family, f"{name} [{engine}]"))
                assert median < (known[0] if known else TARGETS[family]), (engine, family, name, median)


@needs_data
def test_engine_fits_agree_with_the_operators_api(calib, h100):
    """The TRT-LLM fits through operators(gpu, "trtllm") are tools/calibrate.py's curves on the table's rows."""
    import numpy as np
    import pandas as pd

    fits = calibration()["gpus"]["h100-sxm"]["engines"]["trtllm"]
    ops = cost.operators(h100, "trtllm")
    rng = random.Random(1)
    fname = "aic_h100_sxm_trtllm_gemm_perf.csv.gz"
    X, t, _, _ = calib.gemm_data(pd.read_csv(DATA / fname), "fp8", h100, fname)
    numpy_side = calib.gemm_pred(fits["gemm"]["fp8"]["params"], X, warm_l2=False)
    for i in rng.sample(range(len(t)), 100):
        assert math.isclose(ops.gemm_time(X["m"][i], X["n"][i], X["k"][i], "fp8"), numpy_side[i], rel_tol=1e-9)
    fname = "aic_h100_sxm_trtllm_context_attention_perf.csv.gz"
    fit = fits["attention_prefill"]["fp8"]
    df = pd.read_csv(DATA / fname).query(fit["rows"])
    X, t, _, d = calib.prefill_data(df, "fp8", None, h100, fname, fit["attn_dtype"])
    numpy_side = calib.prefill_pred(fit["params"], X, warm_l2=False)
    for i in rng.sample(range(len(t)), 100):
        row = d.iloc[i]
        chunks = [(int(row.isl), 0)] * int(row.batch_size)
        via_api = ops.attention_prefill_time(chunks, int(row.num_heads), int(row.num_key_value_heads),
                                             int(row.head_dim), "fp8")
        assert math.isclose(via_api, numpy_side[i], rel_tol=1e-9)
    fname = "aic_h100_sxm_trtllm_generation_attention_perf.csv.gz"
    fit = fits["attention_decode"]["bf16"]
    df = pd.read_csv(DATA / fname).query(fit["rows"])
    X, t, _, d = calib.decode_data(df, "bfloat16", None, h100, fname)
    numpy_side = calib.decode_pred(fit["params"], X, warm_l2=False)
    for i in rng.sample(range(len(t)), 100):
        row = d.iloc[i]
        via_api = ops.attention_decode_time(int(row.batch_size), int(row.batch_size * (row.step + 1)),
                                            int(row.num_heads), int(row.num_key_value_heads), int(row.head_dim))
        assert math.isclose(via_api, numpy_side[i], rel_tol=1e-9)
    assert np.all(numpy_side > 0)


@needs_data
def test_8b_gemms_against_the_tables(h100):
    """A Llama-3.1-8B layer's GEMMs at 440 rows against the table's rows at the m around 440
    (vLLM: 384 and 512; TRT-LLM's grid: 256 and 512): q/k/v and o at their own (n, k), gate+up
    (n 28672) and down (k 14336) interpolated geometrically between the table's shapes around them
    (n 16384 and 65536; k 12288 and 16384), then in log m to 440. Each engine's fit is within 10%
    of that, and every table m orders fp8 and bf16 as the fit does: TRT-LLM's fp8 faster, vLLM's
    per-tensor fp8 slower (the table's truth: vLLM 0.14's fp8 kernels at these shapes). vLLM's
    fp8 rows are not monotone in m (m=384 is slower than 512), so its fit is within 10% at 440
    but 11-17% off at single m."""
    import pandas as pd

    def measured(rows, n, k):
        if (n, k) in rows.index:
            return rows[n, k]
        (a, b), x, lo, hi = ((16384, 4096), (65536, 4096)), n, 16384, 65536
        if n == 4096:
            (a, b), x, lo, hi = ((4096, 12288), (4096, 16384)), k, 12288, 16384
        w = math.log(x / lo) / math.log(hi / lo)
        return rows[a] * (rows[b] / rows[a]) ** w

    for engine, around in (("vllm", (384, 512)), ("trtllm", (256, 512))):
        df = pd.read_csv(DATA / f"aic_h100_sxm_{engine}_gemm_perf.csv.gz")
        ops = cost.operators(h100, engine)
        w = math.log(440 / around[0]) / math.log(around[1] / around[0])
        for dtype, name in (("bfloat16", "bf16"), ("fp8", "fp8")):
            rows = df[(df.gemm_dtype == dtype)].set_index(["m", "n", "k"]).latency * 1e-3
            lo, hi = (sum(measured(rows[m], n, k) for n, k in LLAMA8B_GEMMS) for m in around)
            table = lo * (hi / lo) ** w
            fit = llama8b_gemm_seconds(ops, 440, name)
            assert abs(fit / table - 1) < 0.10, (engine, name, fit, table)
        for m in (256, 384, 512):
            if m not in set(df.m):
                continue
            layer = {name: sum(measured(df[(df.gemm_dtype == dtype) & (df.m == m)].set_index(["n", "k"]).latency,
                                        n, k) for n, k in LLAMA8B_GEMMS)
                     for dtype, name in (("bfloat16", "bf16"), ("fp8", "fp8"))}
            faster = layer["fp8"] < layer["bf16"]
            assert faster == (engine == "trtllm"), (engine, m, layer)
            assert (llama8b_gemm_seconds(ops, m, "fp8") < llama8b_gemm_seconds(ops, m, "bf16")) == faster
