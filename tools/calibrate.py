"""Fit the cost model's operator constants on measured GPU data and write stdlib/calibration.json.

    python tools/calibrate.py [--data ../shared/calibration] [--out stdlib/calibration.json] [--check]

Data: the shared calibration set (see its README): ai-dynamo/aiconfigurator's performance
database (Apache-2.0: vLLM GEMM, context and generation attention, NCCL collectives) and
microsoft/vidur's profiling (MIT: per-op layer timings, all-reduce and send/recv). Every fit
uses one source, one GPU and one software version; sources are never mixed.

The functional forms are the ones compiler/model/operators.py evaluates (its module docstring lists them);
here they are written again with numpy, and tests/test_calibration.py checks the two agree.

A deterministic 20% of the rows (crc32 of the row's key % 5 == 0) is held out of every fit;
the table printed at the end, and the `error` recorded with each fit, are absolute percentage
errors on those held-out rows only. Fitting minimizes a robust (soft-L1) loss on log(time).

`--check` fits and prints without writing the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "calibration"
DEFAULT_OUT = REPO / "stdlib" / "calibration.json"

TARGETS = {"gemm": 0.10, "attention_prefill": 0.10, "attention_decode": 0.10, "collectives": 0.15,
           "sendrecv": 0.15, "elementwise": None}  # elementwise: vidur's timings have a 1 us resolution

# stdlib GPU name -> aiconfigurator file key; L2 sizes (bytes) seed the warm-cache term of the GEMM fit
GPUS = {
    "a100-sxm-80g": {"aic": "a100_sxm", "vidur": "a100", "l2": 40e6},
    "h100-sxm": {"aic": "h100_sxm", "vidur": "h100", "l2": 50e6},
    "h200-sxm": {"aic": "h200_sxm", "vidur": None, "l2": 50e6},
    "l40s": {"aic": "l40s", "vidur": None, "l2": 96e6},
    "b200": {"aic": "b200_sxm", "vidur": None, "l2": 126e6},
}
# Kernels picked per GPU where a file mixes several (one kernel source per fit).
PREFILL_KERNELS = {"b200": {"bf16": "vllm_flashinfer_trtllmprefill", "fp8": "vllm_flashinfer_trtllmprefill"},
                   "l40s": {"bf16": "vllm_flash_attn", "fp8": "vllm_flashinfer"}}
DECODE_KERNELS = {"b200": {"bf16": "vllm_flashinfer_trtllmdecode", "fp8": "vllm_flashinfer_trtllmdecode"},
                  "l40s": {"bf16": "vllm_flash_attn", "fp8": "vllm_flashinfer"}}
GEMM_DTYPES = {"bfloat16": ("bf16", "bf16", 2.0, 2.0), "fp8": ("fp8", "fp8", 1.0, 1.0),
               "fp8_block": ("fp8_block", "fp8", 1.0, 1.0), "nvfp4": ("fp4", "fp4", 0.5, 0.5)}
KV_DTYPES = {"bfloat16": ("bf16", 2.0), "fp8": ("fp8", 1.0)}
NCCL_OPS = {"all_reduce": "allreduce", "all_gather": "allgather", "reduce_scatter": "reducescatter",
            "alltoall": "alltoall"}
NCCL_DTYPE_BYTES = {"half": 2.0, "int8": 1.0}
# Vidur's DGX systems: the NIC behind one GPU (DGX A100: ConnectX-6 HDR 200 Gb/s per GPU;
# DGX H100: ConnectX-7 NDR 400 Gb/s per GPU). An assumption: vidur does not record it.
VIDUR_IB_LINK = {"a100": "ib-hdr", "h100": "ib-ndr"}
# Tables left out of the fits, with the reason (recorded in the JSON).
FP8_BLOCK_NOTE = ("aiconfigurator times vLLM's block-scaled fp8 GEMMs without CUDA graphs (use_cuda_graph is off "
                  "for fp8_block in collector/vllm/collect_gemm.py), so their floor is host launch overhead that "
                  "CUDA-graph serving does not pay (B200 DeepGEMM: ~0.17 ms for any shape); fp8 weights use the "
                  "per-tensor fp8 fit instead")
EXCLUDED = {(gpu, "fp8_block"): FP8_BLOCK_NOTE for gpu in GPUS}
PROJECTS = {"aic": ("ai-dynamo/aiconfigurator", "Apache-2.0"), "vidur": ("microsoft/vidur", "MIT")}


MAX_TRAIN = 8000  # training rows per fit (evenly spaced subsample of larger tables)


def held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % 5 == 0


def sig4(x: float) -> float:
    return float(f"{x:.4g}")


# ----------------------------------------------------------------------------- numpy forms


def s(x, x0, a):
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(x > 0, 1.0 / (1.0 + (x0 / np.maximum(x, 1e-300)) ** a), 0.0)


def comb(tc, tm, p):
    return (tc ** p + tm ** p) ** (1.0 / p)


def gemm_pred(c, X, warm_l2=True):
    """cost.gemm_curve, vectorized; `warm_l2` adds the fit-only warm-L2 term (see fit_gemm)."""
    F, B = X["F"], X["B"]
    eff_c = c["ec"] * s(X["m"], c["m0"], c["am"]) * s(X["n"], c["n0"], c["an"]) * s(X["k"], c["k0"], c["ak"]) \
        * s(F, c["F0"], c["aF"])
    eff_m = c["em"] * s(B, c["B0"], c["aB"]) * s(X["n"], c["nm0"], c["anm"])
    if warm_l2:
        eff_m = eff_m * (1.0 + c["l2"] * (1.0 - s(B, c["L2"], c["aL2"])))
    return c["t0"] + comb(F / (X["peak"] * eff_c), B / (X["bw"] * eff_m), c["p"])


def prefill_pred(c, X):
    """cost.prefill_body + t0, vectorized."""
    q, pairs, h, kv, dqk, dv = X["q"], X["pairs"], X["h"], X["kv"], X["dqk"], X["dv"]
    d = dqk + dv
    F = 2.0 * h * d * (pairs + q * c["tile"] / 2.0)
    B = q * (2.0 * h * d + kv * d * X["kvb"])
    eff = c["ec"] * (d / 256.0) ** c["g"] * s(F, c["F0"], c["aF"]) * s(h * q, c["h0"], c["ah"]) \
        * s(pairs / q, c["k0"], c["ak"])
    nseq = np.maximum(1.0, q * q / (2.0 * pairs))
    return c["t0"] + c["cseq"] * nseq + comb(F / (X["peak"] * eff), B / (X["bw"] * c["em"]), c["p"])


def decode_pred(c, X):
    """cost.decode_body + t0, vectorized."""
    F, B, u = X["F"], X["B"], X["units"]
    eff_m = c["em"] * s(B, c["B0"], c["aB"]) * s(u, c["n0"], c["an"])
    return c["t0"] + c["cseq"] * u + comb(F / (X["peak"] * c["ec"]), B / (X["bw"] * eff_m), c["p"])


def collective_pred(c, X):
    """cost.collective_curve, vectorized (X: bus bytes S, link bandwidth bw)."""
    S = X["S"]
    return c["t0"] + S / (c["eff"] * X["bw"]) * (1.0 + (c["S0"] / S) ** c["c"])


def elementwise_pred(c, X):
    return c["t0"] + X["B"] / (c["em"] * X["bw"])


# (name, initial, low, high, scale): "log" parameters are fitted in log space. Exponents of the
# saturating terms in the work (am, aF, aB; prefill aF, ah; decode aB) stay <= 1 so that time never
# decreases as the work grows: x / s(x) = x + x0^a x^(1-a) is increasing only for a <= 1.
GEMM_SPEC = [("ec", 0.8, 0.05, 1.0, "log"), ("m0", 64, 1, 1e5, "log"), ("am", 0.8, 0.2, 1, "log"),
             ("n0", 256, 1, 1e5, "log"), ("an", 1, 0.2, 4, "log"), ("k0", 256, 1, 1e5, "log"),
             ("ak", 1, 0.2, 4, "log"), ("F0", 1e9, 1e3, 1e15, "log"), ("aF", 0.8, 0.2, 1, "log"),
             ("em", 0.8, 0.05, 1.0, "log"), ("B0", 1e6, 1e2, 1e10, "log"), ("aB", 0.8, 0.2, 1, "log"),
             ("nm0", 256, 1, 1e6, "log"), ("anm", 1, 0.1, 4, "log"), ("t0", 5e-6, 1e-7, 1e-3, "log"),
             ("p", 3, 1, 20, "log"), ("l2", 0.3, 1e-3, 3, "log"), ("L2", 5e7, 1e6, 1e9, "log"),
             ("aL2", 2, 0.5, 8, "log")]
PREFILL_SPEC = [("ec", 0.6, 0.01, 1.0, "log"), ("g", 0.0, -2, 2, "lin"), ("F0", 1e9, 1e3, 1e15, "log"),
                ("aF", 0.8, 0.2, 1, "log"), ("h0", 1e4, 1, 1e8, "log"), ("ah", 0.8, 0.1, 1, "log"),
                ("k0", 32, 0.1, 1e4, "log"), ("ak", 1, 0.1, 4, "log"), ("tile", 32, 0.1, 1024, "log"),
                ("em", 0.5, 0.01, 1.0, "log"), ("t0", 1e-5, 1e-7, 1e-3, "log"), ("cseq", 1e-7, 1e-11, 1e-4, "log"),
                ("p", 2, 1, 20, "log")]
DECODE_SPEC = [("ec", 0.3, 0.001, 1.0, "log"), ("em", 0.7, 0.01, 1.0, "log"), ("B0", 1e6, 1e2, 1e10, "log"),
               ("aB", 0.8, 0.2, 1, "log"), ("n0", 8, 0.01, 1e4, "log"), ("an", 0.5, 0.05, 4, "log"),
               ("t0", 1e-5, 1e-7, 1e-3, "log"), ("cseq", 1e-8, 1e-11, 1e-4, "log"), ("p", 2, 1, 20, "log")]
COLLECTIVE_SPEC = [("t0", 1e-5, 1e-7, 1e-2, "log"), ("eff", 0.7, 0.005, 2.0, "log"), ("S0", 1e5, 1, 1e10, "log"),
                   ("c", 0.5, 0.05, 2.0, "log")]
ELEMENTWISE_SPEC = [("t0", 3e-6, 1e-7, 1e-3, "log"), ("em", 0.5, 0.01, 1.5, "log")]


# ------------------------------------------------------------------------------------ fitting


def _least_squares(res, z0, lo, hi):
    try:
        from scipy.optimize import least_squares
    except ImportError:  # pragma: no cover - numpy fallback: damped Gauss-Newton with clipping
        return _gauss_newton(res, z0, lo, hi)
    r = least_squares(res, z0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, max_nfev=4000)
    return r.x, float(r.cost)


def _gauss_newton(res, z, lo, hi, iters=200):
    def cost(z):
        r = res(z)
        return float(np.sum(2 * 0.05 ** 2 * (np.sqrt(1 + (r / 0.05) ** 2) - 1)))

    lam, z = 1e-3, np.clip(np.asarray(z, float), lo, hi)
    best = cost(z)
    for _ in range(iters):
        r = res(z)
        w = 1 / np.sqrt(np.sqrt(1 + (r / 0.05) ** 2))  # IRLS weights of soft-L1
        J = np.empty((r.size, z.size))
        for j in range(z.size):
            dz = np.zeros_like(z)
            dz[j] = 1e-6 * max(1.0, abs(z[j]))
            J[:, j] = (res(z + dz) - r) / dz[j]
        Jw, rw = J * w[:, None], r * w
        A = Jw.T @ Jw
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -Jw.T @ rw)
        zn = np.clip(z + step, lo, hi)
        c = cost(zn)
        if c < best:
            z, best, lam = zn, c, lam / 3
        else:
            lam *= 4
            if lam > 1e8:
                break
    return z, best


def fit(pred, spec, X, t, train, fixed=None):
    """Fit `pred` (params dict, features dict -> seconds) on the training rows; returns the
    parameters rounded to 4 significant digits. `fixed`: parameters held at given values."""
    fixed = fixed or {}
    if train.sum() > MAX_TRAIN:  # a deterministic subsample keeps large tables fast to fit
        idx = np.flatnonzero(train)
        train = np.zeros_like(train)
        train[idx[np.linspace(0, idx.size - 1, MAX_TRAIN).astype(int)]] = True
    free = [p for p in spec if p[0] not in fixed]
    tr = {k: (v[train] if isinstance(v, np.ndarray) else v) for k, v in X.items()}
    logt = np.log(t[train])

    def unpack(z):
        out = {p[0]: (math.exp(v) if p[4] == "log" else v) for p, v in zip(free, z)}
        out.update(fixed)
        return out

    def tr_(v, p):
        return math.log(v) if p[4] == "log" else v

    lo = np.array([tr_(p[2], p) for p in free])
    hi = np.array([tr_(p[3], p) for p in free])
    z0 = np.clip(np.array([tr_(p[1], p) for p in free]), lo, hi)

    def res(z):
        with np.errstate(all="ignore"):
            r = np.log(pred(unpack(z), tr)) - logt
        return np.nan_to_num(r, nan=10.0, posinf=10.0, neginf=-10.0)

    best = None
    for shift in (0.0, 0.15):  # two starts, some of each parameter's range apart
        z, cost = _least_squares(res, np.clip(z0 + shift * (hi - lo) * (np.arange(len(z0)) % 2 * 2 - 1), lo, hi),
                                 lo, hi)
        if best is None or cost < best[1]:
            best = (z, cost)
    params = unpack(best[0])
    return {k: sig4(params[k]) for k in [p[0] for p in spec]}


def errors(pred, params, X, t, test) -> dict:
    te = {k: (v[test] if isinstance(v, np.ndarray) else v) for k, v in X.items()}
    ape = np.abs(pred(params, te) / t[test] - 1.0)
    return {"median": sig4(float(np.median(ape))), "p90": sig4(float(np.percentile(ape, 90))), "n": int(test.sum())}


# --------------------------------------------------------------------------------- data sets


def _read(data: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(data / name)


def _keys(df: pd.DataFrame, cols: list[str], prefix: str) -> np.ndarray:
    return np.array([held_out(prefix + "|" + ",".join(map(str, row))) for row in df[cols].itertuples(index=False)])


def attention_peak(gpu, kv_dtype: str) -> float:
    """Attention fits are relative to the bf16 peak, or the fp8 peak with an fp8 KV cache where
    the GPU has one (the kernels then run QK^T and PV in fp8: vLLM quantizes the query too)."""
    return gpu.flops["fp8"] if kv_dtype == "fp8" and "fp8" in gpu.flops else gpu.flops["bf16"]


def gemm_data(df: pd.DataFrame, dtype: str, gpu, fname: str):
    """Rows of one GEMM dtype: features for gemm_pred, times (s), held-out mask."""
    name, peak_dtype, ab, wb = GEMM_DTYPES[dtype]
    d = df[df.gemm_dtype == dtype]
    m, n, k = (d[c].to_numpy(float) for c in ("m", "n", "k"))
    X = {"m": m, "n": n, "k": k, "F": 2 * m * n * k, "B": m * k * ab + n * k * wb + 2 * m * n,
         "peak": gpu.flops[peak_dtype], "bw": gpu.memory_bandwidth}
    return X, d.latency.to_numpy(float) * 1e-3, _keys(d, ["gemm_dtype", "m", "n", "k"], fname), d


def prefill_data(df: pd.DataFrame, kv_dtype: str, kernel, gpu, fname: str):
    d = df[df.kv_cache_dtype == kv_dtype]
    if "window_size" in d:
        d = d[d.window_size == 0]
    if kernel:
        d = d[d.kernel_source == kernel]
    b, isl, h, kv, hd = (d[c].to_numpy(float) for c in ("batch_size", "isl", "num_heads", "num_key_value_heads",
                                                        "head_dim"))
    X = {"q": b * isl, "pairs": b * isl * (isl + 1) / 2, "h": h, "kv": kv, "dqk": hd, "dv": hd,
         "kvb": KV_DTYPES[kv_dtype][1], "peak": attention_peak(gpu, kv_dtype), "bw": gpu.memory_bandwidth}
    cols = ["kernel_source", "kv_cache_dtype", "batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim"]
    return X, d.latency.to_numpy(float) * 1e-3, _keys(d, cols, fname), d


def decode_data(df: pd.DataFrame, kv_dtype: str, kernel, gpu, fname: str):
    d = df[df.kv_cache_dtype == kv_dtype]
    if "window_size" in d:
        d = d[d.window_size == 0]
    if kernel:
        d = d[d.kernel_source == kernel]
    b, step, h, kv, hd = (d[c].to_numpy(float) for c in ("batch_size", "step", "num_heads", "num_key_value_heads",
                                                         "head_dim"))
    K = b * (step + 1)  # the collector's sequences hold step + 1 tokens, the new one included
    kvb = KV_DTYPES[kv_dtype][1]
    X = {"F": 4 * h * hd * K, "B": 2 * kv * hd * kvb * K + 4 * h * hd * b, "units": b * kv,
         "peak": attention_peak(gpu, kv_dtype), "bw": gpu.memory_bandwidth}
    cols = ["kernel_source", "kv_cache_dtype", "batch_size", "step", "num_heads", "num_key_value_heads", "head_dim"]
    return X, d.latency.to_numpy(float) * 1e-3, _keys(d, cols, fname), d


# ------------------------------------------------------------------------------------ driver


class Calibrator:
    def __init__(self, data: Path, verbose: bool = True):
        from flowc.stdlib_listing import stdlib_spec

        self.data, self.verbose = data, verbose
        self.std = stdlib_spec()
        self.sources: dict[str, dict] = {}
        self.rows: list[tuple] = []  # (gpu, family, key, median, p90, n, target)
        self.excluded: dict[str, dict] = {}

    def log(self, *args):
        if self.verbose:
            print(*args, file=sys.stderr, flush=True)

    def source(self, project: str, software: str, device: str, files: list[str], note: str = "", tag: str = "",
               gpu: str = "") -> str:
        key = f"{project}:{tag or software}:{gpu or device}".replace(" ", "_").lower()
        repo, license_ = PROJECTS[project]
        entry = self.sources.setdefault(key, {"project": repo, "license": license_, "software": software,
                                              "device": device, "files": []})
        for f in files:
            if f not in entry["files"]:
                entry["files"].append(f)
        if note:
            entry["note"] = note
        return key

    def record(self, gpu, family, key, err, target, extra=""):
        self.rows.append((gpu, family, key, err["median"], err["p90"], err["n"], target, extra))

    # -- families
    def gemm(self, gname, gpu, framework="vllm", fname=None, record=True):
        key = GPUS[gname]["aic"]
        fname = fname or f"aic_{key}_{framework}_gemm_perf.csv.gz"
        df = _read(self.data, fname)
        out = {}
        for dtype in GEMM_DTYPES:
            if dtype not in set(df.gemm_dtype):
                continue
            X, t, test, d = gemm_data(df, dtype, gpu, fname)
            if GEMM_DTYPES[dtype][1] not in gpu.flops:
                continue
            if (gname, dtype) in EXCLUDED:
                self.excluded.setdefault(gname, {})[f"gemm {GEMM_DTYPES[dtype][0]}"] = EXCLUDED[gname, dtype]
                continue
            kernels = sorted(set(d.kernel_source))
            spec = [(n, (GPUS[gname]["l2"] if n == "L2" else i), lo, hi, sc) for n, i, lo, hi, sc in GEMM_SPEC]
            # The warm-L2 term only where the benchmark visibly ran from L2: some row moved its
            # bytes faster than HBM can (L40S, 96 MB L2). Elsewhere it would only trade off
            # against the memory curve and bias the cold (serving) prediction.
            small = X["m"] <= 16  # weight-bound rows: their bytes are the weights
            warm = bool(np.any(X["B"][small] / t[small] > 1.2 * gpu.memory_bandwidth))
            params = fit(gemm_pred, spec, X, t, ~test, None if warm else {"l2": 0.0, "L2": 1e6, "aL2": 1.0})
            err = errors(gemm_pred, params, X, t, test)
            cold = errors(lambda c, Y: gemm_pred(c, Y, warm_l2=False), params, X, t, test)
            src = self.source("aic", f"{d.framework.iloc[0]} {d.version.iloc[0]}", d.device.iloc[0], [fname],
                              gpu=GPUS[gname]["aic"])
            name = GEMM_DTYPES[dtype][0]
            out[name] = {"source": src, "kernel": "+".join(kernels), "params": params,
                         "error": {**err, "median_cold_l2": cold["median"]}}
            if record:
                self.record(gname, "gemm", name, err, TARGETS["gemm"], f"cold-L2 median {cold['median']:.3f}")
            self.log(f"  gemm {gname} {name}: {err} (cold L2 {cold['median']})")
        return out

    def attention(self, gname, gpu, phase, framework="vllm", record=True):
        key = GPUS[gname]["aic"]
        fname = f"aic_{key}_{framework}_{'context' if phase == 'prefill' else 'generation'}_attention_perf.csv.gz"
        df = _read(self.data, fname)
        kernels = (PREFILL_KERNELS if phase == "prefill" else DECODE_KERNELS).get(gname, {})
        out = {}
        for kv_dtype, (name, _) in KV_DTYPES.items():
            if kv_dtype not in set(df.kv_cache_dtype):
                continue
            loader = prefill_data if phase == "prefill" else decode_data
            X, t, test, d = loader(df, kv_dtype, kernels.get(name), gpu, fname)
            if not len(d):
                continue
            if phase == "prefill":
                fixed = {"g": 0.0} if d.head_dim.nunique() == 1 else None
                params = fit(prefill_pred, PREFILL_SPEC, X, t, ~test, fixed)
                err = errors(prefill_pred, params, X, t, test)
            else:
                params = fit(decode_pred, DECODE_SPEC, X, t, ~test)
                err = errors(decode_pred, params, X, t, test)
            src = self.source("aic", f"{d.framework.iloc[0]} {d.version.iloc[0]}", d.device.iloc[0], [fname],
                              gpu=GPUS[gname]["aic"])
            family = f"attention_{phase}"
            out[name] = {"source": src, "kernel": "+".join(sorted(set(d.kernel_source))), "params": params,
                         "error": err}
            if record:
                self.record(gname, family, f"kv {name}", err, TARGETS[family])
            self.log(f"  {family} {gname} kv {name}: {err}")
        return out

    def nccl(self, gname, gpu):
        key = GPUS[gname]["aic"]
        fname = f"aic_{key}_nccl.csv"
        df = _read(self.data, fname)
        link = self.std.links[gpu.interconnect]
        if gname == "l40s":
            # the 8-GPU L40S rows (~1.4 GB/s) come from a misconfigured machine (data README)
            df = df[df.num_gpus < 8]
        src = self.source("aic", f"NCCL {df.version.iloc[0]}", df.device.iloc[0], [fname],
                          "collected with aiconfigurator's TRT-LLM NCCL collector", gpu=key)
        fits: dict = {"source": src, "link": link.name, "link_bandwidth": link.bandwidth}
        for op_name, op in NCCL_OPS.items():
            for n in sorted(set(df.num_gpus)):
                d = df[(df.op_name == op_name) & (df.num_gpus == n)]
                nbytes = d.message_size.to_numpy(float) * d.nccl_dtype.map(NCCL_DTYPE_BYTES).to_numpy(float)
                factor = 2 * (n - 1) / n if op == "allreduce" else (n - 1) / n
                X = {"S": nbytes * factor, "bw": link.bandwidth}
                t = d.latency.to_numpy(float) * 1e-3
                test = _keys(d, ["op_name", "num_gpus", "nccl_dtype", "message_size"], fname)
                params = fit(collective_pred, COLLECTIVE_SPEC, X, t, ~test)
                err = errors(collective_pred, params, X, t, test)
                fits.setdefault(op, {})[str(n)] = {"params": params, "error": err}
                self.record(gname, f"{op} {link.kind}", f"n={n}", err, TARGETS["collectives"])
        self.log(f"  nccl {gname} done")
        return {link.kind: fits}

    def vidur_allreduce(self, gname, gpu, vkey):
        """Vidur all-reduce: nodes of `devices_per_node` GPUs. Within one node: NVLink (an
        alternative to aiconfigurator's NCCL fits); across nodes: InfiniBand-bound."""
        fname = f"vidur_network_{vkey}_dgx_all_reduce.csv"
        df = _read(self.data, fname)
        src = self.source("vidur", "vidur profiling (NCCL via PyTorch; versions not recorded)",
                          f"DGX {vkey.upper()}", [fname], tag="network", gpu=vkey)
        col = "time_stats.all_reduce.median"
        ib = self.std.links[VIDUR_IB_LINK[vkey]]
        nv = self.std.links[gpu.interconnect]
        out = {"nvlink": {"source": src, "link": nv.name, "link_bandwidth": nv.bandwidth},
               "infiniband": {"source": src, "link": ib.name, "link_bandwidth": ib.bandwidth,
                              "note": f"assumes one {ib.name} NIC per GPU; n GPUs on n / devices_per_node nodes"}}
        for (n, dpn), d in df.groupby(["num_workers", "devices_per_node"]):
            kind = "nvlink" if dpn == n else "infiniband"
            link = nv if kind == "nvlink" else ib
            nbytes = d["size"].to_numpy(float) * 2  # fp16 elements
            X = {"S": nbytes * 2 * (n - 1) / n, "bw": link.bandwidth}
            t = d[col].to_numpy(float) * 1e-3
            test = _keys(d, ["num_workers", "devices_per_node", "size"], fname)
            params = fit(collective_pred, COLLECTIVE_SPEC, X, t, ~test)
            err = errors(collective_pred, params, X, t, test)
            entry = {"params": params, "error": err}
            if kind == "infiniband":
                entry["devices_per_node"] = int(dpn)
            out[kind].setdefault("allreduce", {})[str(n)] = entry
            self.record(gname, f"allreduce {kind} (vidur)", f"n={n} dpn={dpn}", err, TARGETS["collectives"])
        self.log(f"  vidur all-reduce {gname} done")
        return out

    def vidur_sendrecv(self, gname, gpu, vkey):
        fname = f"vidur_network_{vkey}_dgx_send_recv.csv"
        df = _read(self.data, fname)
        src = self.source("vidur", "vidur profiling (NCCL via PyTorch; versions not recorded)",
                          f"DGX {vkey.upper()}", [fname], tag="network", gpu=vkey)
        out = {}
        for dpn, d in df.groupby("devices_per_node"):
            kind = "nvlink" if dpn > 1 else "infiniband"
            link = self.std.links[gpu.interconnect if kind == "nvlink" else VIDUR_IB_LINK[vkey]]
            X = {"S": d["size"].to_numpy(float) * 2, "bw": link.bandwidth}
            t = d["time_stats.send_recv.median"].to_numpy(float) * 1e-3
            test = _keys(d, ["devices_per_node", "size"], fname)
            params = fit(collective_pred, COLLECTIVE_SPEC, X, t, ~test)
            err = errors(collective_pred, params, X, t, test)
            out[kind] = {"source": src, "link": link.name, "link_bandwidth": link.bandwidth, "params": params,
                         "error": err}
            self.record(gname, f"sendrecv {kind}", "", err, TARGETS["sendrecv"])
        return out

    def vidur_compute(self, gname, gpu, vkey):
        """Elementwise kernels from vidur's per-op timings, and a cross-source check of the GEMM fit."""
        files = sorted(p.name for p in self.data.glob(f"vidur_compute_{vkey}_*_mlp.csv"))
        frames = []
        for f in files:
            d = pd.read_csv(self.data / f)
            d["file"] = f
            frames.append(d)
        df = pd.concat(frames, ignore_index=True)
        src = self.source("vidur", "vidur profiling (PyTorch kernels; versions not recorded)",
                          f"DGX {vkey.upper()}", files, tag="compute", gpu=vkey)
        T = df.num_tokens.to_numpy(float)
        tp = df.num_tensor_parallel_workers.to_numpy(float)
        hidden, heads, kvh = (df[c].to_numpy(float) for c in ("n_embd", "n_head", "n_kv_head"))
        ffn = df.n_expanded_embd.to_numpy(float)
        hd = hidden / heads
        kv_r = np.maximum(1, kvh / tp)
        ops = {  # op -> (vidur columns, bytes moved)
            "norm": (["input_layernorm", "post_attention_layernorm"], T * hidden * 2 * 2),
            "rope": (["attn_rope"], T * (heads / tp + kv_r) * hd * 2 * 2),
            "act": (["mlp_act"], T * 3 * ffn / tp * 2),
            "add": (["add"], T * hidden * 3 * 2),
            "emb": (["emb"], T * hidden * 2 * 2),
        }
        out = {}
        for op, (cols, nbytes) in ops.items():
            X = {"B": np.concatenate([nbytes] * len(cols)), "bw": gpu.memory_bandwidth}
            t = np.concatenate([df[f"time_stats.{c}.median"].to_numpy(float) for c in cols]) * 1e-3
            test = np.concatenate([_keys(df.assign(op=c), ["file", "op", "num_tokens", "num_tensor_parallel_workers"],
                                         "vidur") for c in cols])
            ok = t > 0
            X["B"], t, test = X["B"][ok], t[ok], test[ok]
            params = fit(elementwise_pred, ELEMENTWISE_SPEC, X, t, ~test)
            err = errors(elementwise_pred, params, X, t, test)
            out[op] = {"source": src, "params": params, "error": err}
            self.record(gname, "elementwise", op, err, TARGETS["elementwise"])
        # cross-check: vidur's projection GEMMs against this GPU's aiconfigurator bf16 GEMM fit
        gemm_ops = {"attn_pre_proj": ((heads + 2 * kvh) / tp * hd, hidden), "attn_post_proj": (hidden, heads / tp * hd),
                    "mlp_up_proj": (2 * ffn / tp, hidden), "mlp_down_proj": (hidden, ffn / tp)}
        return out, files, gemm_ops, df

    def gemm_cross_check(self, gemm_fit, gpu, vidur):
        _, _, gemm_ops, df = vidur
        T = df.num_tokens.to_numpy(float)
        apes = []
        for op, (n, k) in gemm_ops.items():
            X = {"m": T, "n": n, "k": k, "F": 2 * T * n * k, "B": 2 * T * k + 2 * n * k + 2 * T * n,
                 "peak": gpu.flops["bf16"], "bw": gpu.memory_bandwidth}
            t = df[f"time_stats.{op}.median"].to_numpy(float) * 1e-3
            ok = t > 0
            pred = gemm_pred(gemm_fit["params"], {kk: (v[ok] if isinstance(v, np.ndarray) else v)
                                                  for kk, v in X.items()}, warm_l2=False)
            apes.append(np.abs(pred / t[ok] - 1))
        ape = np.concatenate(apes)
        return {"data": "vidur projection GEMMs (attn_pre_proj, attn_post_proj, mlp_up_proj, mlp_down_proj)",
                "median": sig4(float(np.median(ape))), "p90": sig4(float(np.percentile(ape, 90))), "n": int(ape.size)}

    # -- everything
    def run(self, gpus=None) -> dict:
        out = {"format": 1,
               "generated_by": "tools/calibrate.py",
               "holdout": "rows with crc32(key) % 5 == 0 (20%) are never fitted; `error` is the absolute percentage "
                          "error on them (median, p90, n)",
               "units": "seconds, bytes, FLOP/s, bytes/s",
               "forms": FORMS,
               "sources": self.sources, "gpus": {}}
        elementwise_by_gpu = {}
        for gname, info in GPUS.items():
            if gpus and gname not in gpus:
                continue
            gpu = self.std.gpus[gname]
            self.log(f"{gname}:")
            entry = {"peak_flops": dict(sorted(gpu.flops.items())), "memory_bandwidth": gpu.memory_bandwidth}
            entry["gemm"] = self.gemm(gname, gpu)
            entry["attention_prefill"] = self.attention(gname, gpu, "prefill")
            entry["attention_decode"] = self.attention(gname, gpu, "decode")
            entry["collectives"] = self.nccl(gname, gpu)
            alternatives = {}
            if info["vidur"]:
                v = info["vidur"]
                vid = self.vidur_allreduce(gname, gpu, v)
                entry["collectives"]["infiniband"] = vid["infiniband"]
                alternatives["vidur"] = {"collectives": {"nvlink": vid["nvlink"]}}
                if (self.data / f"vidur_network_{v}_dgx_send_recv.csv").exists():
                    entry["sendrecv"] = self.vidur_sendrecv(gname, gpu, v)
                compute = self.vidur_compute(gname, gpu, v)
                entry["elementwise"] = compute[0]
                elementwise_by_gpu[gname] = compute[0]
                entry["gemm"]["bf16"]["cross_check"] = self.gemm_cross_check(entry["gemm"]["bf16"], gpu, compute)
                self.log(f"  gemm cross-check vs vidur: {entry['gemm']['bf16']['cross_check']}")
            if alternatives:
                entry["alternatives"] = alternatives
            if gname in self.excluded:
                entry["excluded"] = self.excluded[gname]
            out["gpus"][gname] = entry
        # GPUs without vidur per-op data borrow the elementwise fits of the nearest one in bandwidth
        for entry in out["gpus"].values():
            if "elementwise" not in entry and elementwise_by_gpu:
                bw = entry["memory_bandwidth"]
                donor = min(elementwise_by_gpu, key=lambda g: abs(math.log(out["gpus"][g]["memory_bandwidth"] / bw)))
                entry["elementwise"] = elementwise_by_gpu[donor]
                entry["borrowed"] = {"elementwise": f"{donor} (vidur)"}
        return out


FORMS = {
    "s": "s(x; x0, a) = 1 / (1 + (x0/x)^a); comb(tc, tm; p) = (tc^p + tm^p)^(1/p)",
    "gemm": "t = t0 + comb(F / (P ec s(m;m0,am) s(n;n0,an) s(k;k0,ak) s(F;F0,aF)), "
            "B / (W em s(B;B0,aB) s(n;nm0,anm) [1 + l2 (1 - s(B;L2,aL2))]); p), F = 2mnk, B = mk a + nk w + 2mn; "
            "the bracket (warm L2 in the benchmark) is fit-only: the cost model streams weights from HBM",
    "attention_prefill": "t = t0 + cseq nseq + comb(F / (P ec (d/256)^g s(F;F0,aF) s(hQ;h0,ah) s(pairs/Q;k0,ak)), "
                         "B / (W em); p), F = 2 h d (pairs + Q tile/2), B = Q (2 h d + kv d kvb), d = dqk + dv, "
                         "nseq = max(1, Q^2 / (2 pairs)), P = bf16 peak (fp8 peak for an fp8 KV cache)",
    "attention_decode": "t = t0 + cseq u + comb(F / (P ec), B / (W em s(B;B0,aB) s(u;n0,an)); p), F = 4 h d K, "
                        "B = 2 kv d kvb K + 4 h d seqs, u = seqs x kv, K = keys read, P as for prefill",
    "collectives": "t = t0 + S / (eff BW) (1 + (S0/S)^c), S = bytes x 2(n-1)/n (allreduce) or (n-1)/n; "
                   "BW = link_bandwidth; keys are GPU counts",
    "sendrecv": "t = t0 + bytes / (eff BW) (1 + (S0/bytes)^c)",
    "elementwise": "t = t0 + bytes / (em W)",
}


def dumps(obj, indent=0) -> str:
    """JSON with dicts of scalars on one line (readable and compact)."""
    pad = " " * indent
    if isinstance(obj, dict):
        if all(not isinstance(v, (dict, list)) for v in obj.values()) and len(obj) <= 24:
            return json.dumps(obj)
        items = [f'{pad}  {json.dumps(k)}: {dumps(v, indent + 2)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        return json.dumps(obj)
    return json.dumps(obj)


def table(rows) -> str:
    lines = [f"{'GPU':<14}{'family':<26}{'case':<14}{'median':>8}{'p90':>8}{'n':>7}  target"]
    for gpu, family, key, med, p90, n, target, extra in rows:
        mark = "" if target is None else ("ok" if med < target else f"MISS (> {target:.0%})")
        lines.append(f"{gpu:<14}{family:<26}{key:<14}{med:>8.1%}{p90:>8.1%}{n:>7}  {mark} {extra}".rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--gpu", action="append", help="only this stdlib GPU (repeatable)")
    ap.add_argument("--check", action="store_true", help="fit and print, do not write")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"no calibration data at {args.data}", file=sys.stderr)
        return 2
    cal = Calibrator(args.data)
    result = cal.run(args.gpu)
    print(table(cal.rows))
    if not args.check:
        args.out.write_text(dumps(result) + "\n", encoding="utf-8")
        print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
