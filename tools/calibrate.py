"""Fit the cost model's operator constants on measured GPU data and write stdlib/calibration.json.

    python tools/calibrate.py [--data ../shared/calibration] [--out stdlib/calibration.json] [--check]

Data: the shared calibration set (see its README): ai-dynamo/aiconfigurator's performance
database (Apache-2.0: vLLM GEMM, context and generation attention, NCCL collectives; TensorRT-LLM
GEMM and attention on H100) and microsoft/vidur's profiling (MIT: per-op layer timings,
all-reduce and send/recv). Every fit uses one source, one GPU and one software version, and one
kernel source where a table mixes several; sources are never mixed.

Kernel sets: a GPU's top-level gemm / attention_prefill / attention_decode fits are vLLM's
kernels (the default set, `DEFAULT_KERNELS`); another engine's kernel tables for the GPU are
fitted with the same forms and rules into gpus[g]["engines"][engine] (ENGINES).

The functional forms are the ones compiler/model/operators.py evaluates (its module docstring lists them);
here they are written again with numpy, and tests/test_calibration.py checks the two agree.

A deterministic 20% of the rows (crc32 of the row's key % 5 == 0) is held out of every fit;
the table printed at the end, and the `error` recorded with each fit, are absolute percentage
errors on those held-out rows only. Fitting minimizes a robust (soft-L1) loss on log(time)
(scipy's least_squares when scipy is importable, else a numpy Gauss-Newton fallback: the two
find different parameters of about equal held-out error; the committed file is scipy's).

Where a benchmark visibly ran from L2 (some row moved bytes faster than HBM can: L40S's 96 MB
L2), GEMM, prefill and decode fits get a fit-only warm-L2 factor on their memory efficiency; the
cost model evaluates the cold curve (serving streams weights and KV from HBM), and the recorded
`median_cold_l2` is that curve's held-out error.

`--check` fits and prints without writing the file. Both print, after the per-fit table, a summary
of the kernel fits' held-out errors by engine, dtype (GEMM: weights; attention: KV cache) and
GPU, whether every fp8 fit meets 10%, and a decode step of Llama-3.1-8B on H100 against its
memory and compute floors for each kernel set.

Findings (see also the "notes" of each GPU in the JSON):
* vLLM's per-tensor fp8 GEMM (Fp8LinearMethod with a static activation scale, as aiconfigurator's
  vLLM 0.14 collector runs it) is measured SLOWER than bf16 on H100 for mid-sized m and narrow or
  deep layers (m=512, n=4096, k=12288: 0.103 ms fp8, 0.061 ms bf16). A Llama-3.1-8B layer at m
  256, 384 and 512 is 12-41% slower in fp8 in the table, so the vLLM fp8 fit predicts an 8B
  decode step's GEMMs slower in fp8 at 440 rows: the table's truth, not a fit error (the fit is
  within 1% of the table interpolated to 440; the rows are not monotone in m, 384 slower than
  512, so single-m errors reach 17%). TensorRT-LLM's fp8 GEMMs at those shapes are 17-22% faster
  than its bf16 ones, and so is its fit.
* L40S fp8 prefill (FlashInfer): with GQA the rows take time in proportion to the KV heads, not
  the query heads (up to 9.5x the fp8 peak implied): only the MHA rows are fitted (ROW_RULES).
* L40S decode and prefill ran from the 96 MB L2 in the benchmark (up to 2.3x HBM bandwidth):
  fit-only warm-L2 term, as for the GEMMs.
* Prefill efficiency grows with the query heads per KV head and the per-sequence cost with the
  KV heads (FlashInfer's TRT-LLM-gen fp8 kernels on B200 most of all): s(h/kv) and kv^ck.
* TensorRT-LLM's decode table mixes XQA (GQA), MHA and a fallback for groups over 32; its
  head_dim-64 cases carry attention sinks: the fits keep GQA with 2-16 heads per KV head.
* GEMM time steps with the waves of output tiles over the SMs (the last tile of a row or column
  and the last wave partly empty): the wave term q^w (operators.wave_fill, 64 x 128 tiles, the
  GPU's SM count; below one tile s(m) and s(n) keep the small shapes). Held-out GEMM error went
  down on 12 of 13 fits (L40S fp8 10.3% -> 8.9%, A100 bf16 7.8% -> 6.9%, B200 fp4 8.2% -> 5.7%,
  TensorRT-LLM fp8_block 8.6% -> 6.9%; H200 fp8 5.7% -> 5.8%), and the independent check against
  Vidur's GEMMs from 13.5% to 11.7% (A100) and 21.0% to 19.7% (H100).
Not fixed: A100 and L40S bf16 decode (12.5%, 10.5%: flash-attn split-KV switches): steps in the
data that a smooth form does not follow.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import pandas as pd

from flowc.compiler.model.operators import GEMM_TILE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "calibration"
DEFAULT_OUT = REPO / "stdlib" / "calibration.json"

TARGETS = {"gemm": 0.10, "attention_prefill": 0.10, "attention_decode": 0.10, "collectives": 0.15,
           "sendrecv": 0.15, "elementwise": None}  # elementwise: vidur's timings have a 1 us resolution

# stdlib GPU name -> aiconfigurator file key; L2 sizes (bytes) seed the warm-cache term of the GEMM fit
# and SM counts the GEMM wave term (NVIDIA's architecture whitepapers: A100 108, H100 SXM5 132,
# H200 the same GH100 configuration, L40S (AD102) 142, B200 148)
GPUS = {
    "a100-sxm-80g": {"aic": "a100_sxm", "vidur": "a100", "l2": 40e6, "sms": 108},
    "h100-sxm": {"aic": "h100_sxm", "vidur": "h100", "l2": 50e6, "sms": 132},
    "h200-sxm": {"aic": "h200_sxm", "vidur": None, "l2": 50e6, "sms": 132},
    "l40s": {"aic": "l40s", "vidur": None, "l2": 96e6, "sms": 142},
    "b200": {"aic": "b200_sxm", "vidur": None, "l2": 126e6, "sms": 148},
}
# Engines other than vLLM whose aiconfigurator kernel tables are fitted where a GPU has them
# (aic_{gpu}_{engine}_gemm_perf.csv.gz etc.): gpus[g]["engines"][engine].
DEFAULT_KERNELS = "vllm"
ENGINES = ("trtllm",)
# Kernels picked per GPU where a file mixes several (one kernel source per fit).
PREFILL_KERNELS = {"b200": {"bf16": "vllm_flashinfer_trtllmprefill", "fp8": "vllm_flashinfer_trtllmprefill"},
                   "l40s": {"bf16": "vllm_flash_attn", "fp8": "vllm_flashinfer"}}
DECODE_KERNELS = {"b200": {"bf16": "vllm_flashinfer_trtllmdecode", "fp8": "vllm_flashinfer_trtllmdecode"},
                  "l40s": {"bf16": "vllm_flash_attn", "fp8": "vllm_flashinfer"}}
# TensorRT-LLM's context-attention table times two kernels with an fp8 KV cache: the FP8 context
# FMHA (attn_dtype fp8: Q, K, V in fp8, what an fp8 checkpoint with an fp8 cache runs) and the
# bf16 FMHA writing an fp8 cache. One per fit: the FMHA dtype that goes with each KV dtype.
ATTN_DTYPES = {("trtllm", "prefill"): {"bfloat16": "bfloat16", "fp8": "fp8"}}
# Rows of an attention table that are not the kernel a fit stands for, and why (the query is
# recorded with the fit as "rows", the reason in the GPU's "notes"):
# (engine, GPU or None, phase, KV dtype or None) -> (pandas query of the rows kept, why).
ROW_RULES = {
    ("vllm", "l40s", "prefill", "fp8"): (
        "num_heads == num_key_value_heads",
        "MHA rows only: with GQA, FlashInfer's fp8-KV prefill rows on L40S take time in proportion to the KV "
        "heads, not the query heads (up to 9.5x the fp8 peak implied): the collector's call does not do the "
        "declared work there"),
    ("trtllm", None, "prefill", None): (
        "head_dim != 64",
        "aiconfigurator's TRT-LLM attention collector passes attention sinks with every head_dim-64 case "
        "(GPT-OSS attention); the fits are of plain attention"),
    ("trtllm", None, "decode", None): (
        "head_dim != 64 and num_key_value_heads < num_heads <= 16 * num_key_value_heads",
        "XQA rows of GQA with 2-16 query heads per KV head (the stdlib's GQA models have 4-16). MHA rows (kv == h) "
        "have per-sequence costs that the form's per-(sequence x KV head) term cannot share with GQA, groups over "
        "16 lose efficiency in steps (over 32: a fallback kernel at ~1/30 of the bandwidth), and head_dim-64 rows "
        "carry attention sinks"),
}
GEMM_DTYPES = {"bfloat16": ("bf16", "bf16", 2.0, 2.0), "fp8": ("fp8", "fp8", 1.0, 1.0),
               "fp8_block": ("fp8_block", "fp8", 1.0, 1.0), "nvfp4": ("fp4", "fp4", 0.5, 0.5)}
KV_DTYPES = {"bfloat16": ("bf16", 2.0), "fp8": ("fp8", 1.0)}
# The summary's dtype of a GEMM fit (its weight dtype); attention fits go by their KV dtype.
DTYPE_GROUP = {"bf16": "bf16", "fp8": "fp8", "fp8_block": "fp8", "fp4": "fp4"}
SUMMARY_DTYPES = ("bf16", "fp8", "fp4")
KERNEL_FAMILIES = ("gemm", "attention_prefill", "attention_decode")
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
EXCLUDED = {("vllm", gpu, "fp8_block"): FP8_BLOCK_NOTE for gpu in GPUS}
PROJECTS = {"aic": ("ai-dynamo/aiconfigurator", "Apache-2.0"), "vidur": ("microsoft/vidur", "MIT")}


MAX_TRAIN = 8000  # training rows per fit (evenly spaced subsample of larger tables)


class Row(NamedTuple):
    """One fit's line in the printed table (and the held-out errors behind the summary)."""

    gpu: str
    family: str
    case: str
    median: float
    p90: float
    n: int
    target: Optional[float]
    extra: str = ""
    engine: str = DEFAULT_KERNELS
    dtype: Optional[str] = None  # GEMM: weight dtype group; attention: KV dtype; else None
    ape: Optional[np.ndarray] = None


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
    """operators.gemm_curve, vectorized; `warm_l2` adds the fit-only warm-L2 term (see fit_gemm)."""
    F, B = X["F"], X["B"]
    m, n = np.maximum(X["m"], GEMM_TILE[0]), np.maximum(X["n"], GEMM_TILE[1])
    tiles = np.ceil(m / GEMM_TILE[0]) * np.ceil(n / GEMM_TILE[1])
    filled = m * n / (np.ceil(tiles / c["sms"]) * c["sms"] * GEMM_TILE[0] * GEMM_TILE[1])
    eff_c = c["ec"] * s(X["m"], c["m0"], c["am"]) * s(X["n"], c["n0"], c["an"]) * s(X["k"], c["k0"], c["ak"]) \
        * s(F, c["F0"], c["aF"]) * filled ** c["w"]
    eff_m = c["em"] * s(B, c["B0"], c["aB"]) * s(X["n"], c["nm0"], c["anm"])
    if warm_l2:
        eff_m = eff_m * (1.0 + c["l2"] * (1.0 - s(B, c["L2"], c["aL2"])))
    return c["t0"] + comb(F / (X["peak"] * eff_c), B / (X["bw"] * eff_m), c["p"])


def warm(c, B):
    """The fit-only warm-L2 factor on the memory efficiency: 1 + l2 (1 - s(B; L2, aL2)) (1 without l2)."""
    if "l2" not in c:
        return 1.0
    return 1.0 + c["l2"] * (1.0 - s(B, c["L2"], c["aL2"]))


def prefill_pred(c, X, warm_l2=True):
    """cost.prefill_body + t0, vectorized; `warm_l2` adds the fit-only warm-L2 term (see Calibrator.attention)."""
    q, pairs, h, kv, dqk, dv = X["q"], X["pairs"], X["h"], X["kv"], X["dqk"], X["dv"]
    d = dqk + dv
    F = 2.0 * h * d * (pairs + q * c["tile"] / 2.0)
    B = q * (2.0 * h * d + kv * d * X["kvb"])
    eff = c["ec"] * (d / 256.0) ** c["g"] * s(F, c["F0"], c["aF"]) * s(h * q, c["h0"], c["ah"]) \
        * s(pairs / q, c["k0"], c["ak"]) * s(h / kv, c.get("r0", 0.0), c.get("ar", 1.0))
    nseq = np.maximum(1.0, q * q / (2.0 * pairs))
    em = c["em"] * (warm(c, B) if warm_l2 else 1.0)
    return c["t0"] + c["cseq"] * nseq * np.maximum(kv, 1.0) ** c.get("ck", 0.0) \
        + comb(F / (X["peak"] * eff), B / (X["bw"] * em), c["p"])


def decode_pred(c, X, warm_l2=True):
    """cost.decode_body + t0, vectorized; `warm_l2` adds the fit-only warm-L2 term (see Calibrator.attention)."""
    F, B, u = X["F"], X["B"], X["units"]
    eff_m = c["em"] * s(B, c["B0"], c["aB"]) * s(u, c["n0"], c["an"]) * (warm(c, B) if warm_l2 else 1.0)
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
             ("aL2", 2, 0.5, 8, "log"), ("w", 0.2, 0.0, 2.0, "lin"), ("sms", 132, 1, 1000, "lin")]
PREFILL_SPEC = [("ec", 0.6, 0.01, 1.0, "log"), ("g", 0.0, -2, 2, "lin"), ("F0", 1e9, 1e3, 1e15, "log"),
                ("aF", 0.8, 0.2, 1, "log"), ("h0", 1e4, 1, 1e8, "log"), ("ah", 0.8, 0.1, 1, "log"),
                ("k0", 32, 0.1, 1e4, "log"), ("ak", 1, 0.1, 4, "log"), ("tile", 32, 0.1, 1024, "log"),
                ("em", 0.5, 0.01, 1.0, "log"), ("t0", 1e-5, 1e-7, 1e-3, "log"), ("cseq", 1e-7, 1e-11, 1e-4, "log"),
                ("p", 2, 1, 20, "log"), ("r0", 1.0, 0.01, 1e3, "log"), ("ar", 1.0, 0.05, 4, "log"),
                ("ck", 0.3, 0.0, 2.0, "lin")]
DECODE_SPEC = [("ec", 0.3, 0.001, 1.0, "log"), ("em", 0.7, 0.01, 1.0, "log"), ("B0", 1e6, 1e2, 1e10, "log"),
               ("aB", 0.8, 0.2, 1, "log"), ("n0", 8, 0.01, 1e4, "log"), ("an", 0.5, 0.05, 4, "log"),
               ("t0", 1e-5, 1e-7, 1e-3, "log"), ("cseq", 1e-8, 1e-11, 1e-4, "log"), ("p", 2, 1, 20, "log")]
# The fit-only warm-L2 term of every fit (GEMM, prefill, decode): free where the benchmark ran
# from L2 (`ran_warm`), else held at these values (no term).
WARM_SPEC = [("l2", 0.3, 1e-3, 10, "log"), ("L2", 5e7, 1e6, 1e9, "log"), ("aL2", 2, 0.5, 8, "log")]
COLD = {"l2": 0.0, "L2": 1e6, "aL2": 1.0}
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


def ran_warm(B, t, bw) -> bool:
    """Whether the benchmark visibly ran from L2: some row moved its bytes faster than HBM can
    (1.2 x the bandwidth). Only there is the warm-L2 term fitted; elsewhere it would only trade
    off against the memory curve and bias the cold (serving) prediction."""
    return bool(np.any(B / t > 1.2 * bw))


def heldout_ape(pred, params, X, t, test) -> np.ndarray:
    """Absolute relative errors of `pred` on the held-out rows."""
    te = {k: (v[test] if isinstance(v, np.ndarray) else v) for k, v in X.items()}
    return np.abs(pred(params, te) / t[test] - 1.0)


def summarize(ape: np.ndarray) -> dict:
    return {"median": sig4(float(np.median(ape))), "p90": sig4(float(np.percentile(ape, 90))), "n": int(ape.size)}


def errors(pred, params, X, t, test) -> dict:
    return summarize(heldout_ape(pred, params, X, t, test))


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


def row_rule(engine: str, gname: str, phase: str, kv: str):
    """The ROW_RULES entry for one attention fit, or None."""
    for key in ((engine, gname, phase, kv), (engine, gname, phase, None), (engine, None, phase, kv),
                (engine, None, phase, None)):
        if key in ROW_RULES:
            return ROW_RULES[key]
    return None


def prefill_data(df: pd.DataFrame, kv_dtype: str, kernel, gpu, fname: str, attn_dtype=None):
    """Rows of one KV dtype (and kernel source, and FMHA dtype when given) without a sliding window."""
    d = df[df.kv_cache_dtype == kv_dtype]
    if "window_size" in d:
        d = d[d.window_size == 0]
    if kernel:
        d = d[d.kernel_source == kernel]
    if attn_dtype:
        d = d[d.attn_dtype == attn_dtype]
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
        self.rows: list[Row] = []  # one per fit, in the order fitted
        self.excluded: dict[str, dict] = {}
        self.notes: dict[str, dict] = {}

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

    def record(self, gpu, family, key, err, target, extra="", engine=DEFAULT_KERNELS, dtype=None, ape=None):
        self.rows.append(Row(gpu, family, key, err["median"], err["p90"], err["n"], target, extra, engine, dtype, ape))

    # -- families
    def gemm(self, gname, gpu, framework=DEFAULT_KERNELS, fname=None, record=True):
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
            name = GEMM_DTYPES[dtype][0]
            if (framework, gname, dtype) in EXCLUDED:
                label = f"gemm {name}" if framework == DEFAULT_KERNELS else f"{framework} gemm {name}"
                self.excluded.setdefault(gname, {})[label] = EXCLUDED[framework, gname, dtype]
                continue
            kernels = sorted(set(d.kernel_source))
            spec = [(n, (GPUS[gname]["l2"] if n == "L2" else i), lo, hi, sc) for n, i, lo, hi, sc in GEMM_SPEC]
            # The warm-L2 term only where the benchmark visibly ran from L2: some row moved its
            # bytes faster than HBM can (L40S, 96 MB L2). Elsewhere it would only trade off
            # against the memory curve and bias the cold (serving) prediction.
            small = X["m"] <= 16  # weight-bound rows: their bytes are the weights
            warm = ran_warm(X["B"][small], t[small], gpu.memory_bandwidth)
            params = fit(gemm_pred, spec, X, t, ~test, {"sms": GPUS[gname]["sms"], **({} if warm else COLD)})
            ape = heldout_ape(gemm_pred, params, X, t, test)
            err = summarize(ape)
            cold = errors(lambda c, Y: gemm_pred(c, Y, warm_l2=False), params, X, t, test)
            src = self.source("aic", f"{d.framework.iloc[0]} {d.version.iloc[0]}", d.device.iloc[0], [fname],
                              gpu=GPUS[gname]["aic"])
            out[name] = {"source": src, "kernel": "+".join(kernels), "params": params,
                         "error": {**err, "median_cold_l2": cold["median"]}}
            if record:
                self.record(gname, "gemm", name, err, TARGETS["gemm"], f"cold-L2 median {cold['median']:.3f}",
                            engine=framework, dtype=DTYPE_GROUP[name], ape=ape)
            self.log(f"  gemm {framework} {gname} {name}: {err} (cold L2 {cold['median']})")
        return out

    def attention(self, gname, gpu, phase, framework=DEFAULT_KERNELS, record=True):
        """Prefill or decode attention fits per KV dtype: one kernel source (PREFILL_KERNELS,
        DECODE_KERNELS), FMHA dtype (ATTN_DTYPES) and row set (ROW_RULES) each. Where the benchmark
        visibly ran from L2 (L40S: KV and activations under 96 MB stay there between repeats) the
        fit-only warm-L2 term is fitted too; the cost model evaluates the cold curve (`warm_l2`
        off), and `median_cold_l2` is that curve's held-out error."""
        key = GPUS[gname]["aic"]
        fname = f"aic_{key}_{framework}_{'context' if phase == 'prefill' else 'generation'}_attention_perf.csv.gz"
        df = _read(self.data, fname)
        kernels = (PREFILL_KERNELS if phase == "prefill" else DECODE_KERNELS).get(gname, {}) \
            if framework == DEFAULT_KERNELS else {}
        attn_dtypes = ATTN_DTYPES.get((framework, phase), {})
        family = f"attention_{phase}"
        pred, base_spec = (prefill_pred, PREFILL_SPEC) if phase == "prefill" else (decode_pred, DECODE_SPEC)
        warm_spec = [(n, (GPUS[gname]["l2"] if n == "L2" else i), lo, hi, sc) for n, i, lo, hi, sc in WARM_SPEC]
        out = {}
        for kv_dtype, (name, _) in KV_DTYPES.items():
            if kv_dtype not in set(df.kv_cache_dtype):
                continue
            attn_dtype = attn_dtypes.get(kv_dtype)
            rule = row_rule(framework, gname, phase, name)
            rows = df.query(rule[0]) if rule else df
            if phase == "prefill":
                X, t, test, d = prefill_data(rows, kv_dtype, kernels.get(name), gpu, fname, attn_dtype)
                dd = X["dqk"] + X["dv"]
                nbytes = X["q"] * (2.0 * X["h"] * dd + X["kv"] * dd * X["kvb"])
            else:
                X, t, test, d = decode_data(rows, kv_dtype, kernels.get(name), gpu, fname)
                nbytes = X["B"]
            if not len(d):
                continue
            fixed = {} if ran_warm(nbytes, t, gpu.memory_bandwidth) else dict(COLD)
            if phase == "prefill" and d.head_dim.nunique() == 1:
                fixed["g"] = 0.0
            params = fit(pred, base_spec + warm_spec, X, t, ~test, fixed)
            ape = heldout_ape(pred, params, X, t, test)
            err = summarize(ape)
            if "l2" not in fixed:
                err["median_cold_l2"] = errors(lambda c, Y: pred(c, Y, warm_l2=False), params, X, t, test)["median"]
            src = self.source("aic", f"{d.framework.iloc[0]} {d.version.iloc[0]}", d.device.iloc[0], [fname],
                              gpu=GPUS[gname]["aic"])
            out[name] = {"source": src, "kernel": "+".join(sorted(set(d.kernel_source))), "params": params,
                         "error": err}
            if attn_dtype:
                out[name]["attn_dtype"] = attn_dtype
            if rule:
                out[name]["rows"] = rule[0]
                label = family if framework == DEFAULT_KERNELS else f"{framework} {family}"
                self.notes.setdefault(gname, {})[f"{label} rows"] = rule[1]
            extra = f"cold-L2 median {err['median_cold_l2']:.3f}" if "median_cold_l2" in err else ""
            if record:
                self.record(gname, family, f"kv {name}", err, TARGETS[family], extra, engine=framework, dtype=name,
                            ape=ape)
            self.log(f"  {family} {framework} {gname} kv {name}: {err}")
        return out

    def engine_fits(self, gname, gpu) -> dict:
        """Other engines' kernel fits for this GPU, where the shared data has their tables."""
        key = GPUS[gname]["aic"]
        out = {}
        for engine in ENGINES:
            tables = {"gemm": f"aic_{key}_{engine}_gemm_perf.csv.gz",
                      "attention_prefill": f"aic_{key}_{engine}_context_attention_perf.csv.gz",
                      "attention_decode": f"aic_{key}_{engine}_generation_attention_perf.csv.gz"}
            fits = {}
            for family, fname in tables.items():
                if not (self.data / fname).exists():
                    continue
                if family == "gemm":
                    fits[family] = self.gemm(gname, gpu, engine)
                else:
                    fits[family] = self.attention(gname, gpu, family.split("_")[1], engine)
            if fits:
                out[engine] = fits
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
            entry["kernels"] = DEFAULT_KERNELS
            entry["gemm"] = self.gemm(gname, gpu)
            entry["attention_prefill"] = self.attention(gname, gpu, "prefill")
            entry["attention_decode"] = self.attention(gname, gpu, "decode")
            engines = self.engine_fits(gname, gpu)
            if engines:
                entry["engines"] = engines
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
            if gname in self.notes:
                entry["notes"] = self.notes[gname]
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
    "attention_prefill": "t = t0 + cseq nseq kv^ck + comb(F / (P ec (d/256)^g s(F;F0,aF) s(hQ;h0,ah) "
                         "s(pairs/Q;k0,ak) s(h/kv;r0,ar)), B / (W em [warm]); p), F = 2 h d (pairs + Q tile/2), "
                         "B = Q (2 h d + kv d kvb), d = dqk + dv, nseq = max(1, Q^2 / (2 pairs)), P = bf16 peak "
                         "(fp8 peak for an fp8 KV cache); [warm] = 1 + l2 (1 - s(B;L2,aL2)) is fit-only, as for GEMM",
    "attention_decode": "t = t0 + cseq u + comb(F / (P ec), B / (W em s(B;B0,aB) s(u;n0,an) [warm]); p), "
                        "F = 4 h d K, B = 2 kv d kvb K + 4 h d seqs, u = seqs x kv, K = keys read, P as for prefill; "
                        "[warm] fit-only, as for prefill",
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
    lines = [f"{'GPU':<14}{'engine':<8}{'family':<28}{'case':<14}{'median':>8}{'p90':>8}{'n':>7}  target"]
    for r in rows:
        mark = "" if r.target is None else ("ok" if r.median < r.target else f"MISS (> {r.target:.0%})")
        engine = r.engine if r.family in KERNEL_FAMILIES else "-"
        lines.append(f"{r.gpu:<14}{engine:<8}{r.family:<28}{r.case:<14}{r.median:>8.1%}{r.p90:>8.1%}{r.n:>7}  "
                     f"{mark} {r.extra}".rstrip())
    return "\n".join(lines)


def summary(rows, fp8_target: float = 0.10) -> str:
    """Kernel fits (GEMM, prefill and decode attention) grouped by engine, dtype and GPU: the
    median absolute error over the pooled held-out rows of the group's fits, and their number;
    then whether every fp8 fit (GEMM weights fp8 or fp8_block, attention with an fp8 KV cache)
    has a held-out median under `fp8_target`."""
    kernel_rows = [r for r in rows if r.family in KERNEL_FAMILIES and r.ape is not None]
    gpus = list(dict.fromkeys(r.gpu for r in kernel_rows))
    engines = [e for e in (DEFAULT_KERNELS, *ENGINES) if any(r.engine == e for r in kernel_rows)]

    def cell(group) -> str:
        if not group:
            return "-"
        ape = np.concatenate([r.ape for r in group])
        return f"{np.median(ape):.1%} ({ape.size})"

    width = 15
    lines = ["Kernel fits by engine, dtype (GEMM: weights; attention: KV cache) and GPU: median held-out "
             "|error| (n rows)",
             f"{'engine':<8}{'dtype':<7}" + "".join(f"{g:>{width}}" for g in gpus) + f"{'all GPUs':>{width}}"]
    for engine in engines:
        for dtype in SUMMARY_DTYPES:
            sel = [r for r in kernel_rows if r.engine == engine and r.dtype == dtype]
            if not sel:
                continue
            lines.append(f"{engine:<8}{dtype:<7}" + "".join(f"{cell([r for r in sel if r.gpu == g]):>{width}}"
                                                         for g in gpus) + f"{cell(sel):>{width}}")
        sel = [r for r in kernel_rows if r.engine == engine]
        lines.append(f"{engine:<8}{'all':<7}" + "".join(f"{cell([r for r in sel if r.gpu == g]):>{width}}"
                                                     for g in gpus) + f"{cell(sel):>{width}}")
    fp8 = [r for r in kernel_rows if r.dtype == "fp8"]
    misses = [r for r in fp8 if r.median >= fp8_target]
    if not fp8:
        lines.append("fp8 operator fits: none fitted")
    elif not misses:
        lines.append(f"fp8 operator fits within {fp8_target:.0%} median held-out error: YES, all {len(fp8)} "
                     "(GEMM fp8/fp8_block, attention with an fp8 KV cache; every GPU and engine)")
    else:
        listed = "; ".join(f"{r.gpu} {r.engine} {r.family} {r.case} {r.median:.1%}" for r in misses)
        lines.append(f"fp8 operator fits within {fp8_target:.0%} median held-out error: NO, {len(misses)} of "
                     f"{len(fp8)} miss: {listed}")
    return "\n".join(lines)


# The decode step checked against its floors: Llama-3.1-8B on one H100, 440 sequences of 1152 keys.
STEP_CHECK = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "seqs": 440, "keys": 1152,
              "dtypes": (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp8"))}


def step_check(result: dict) -> str:
    """Predicted decode-step time of STEP_CHECK for each (weights, KV) dtype and kernel set, with
    the fits just made (`result`), against the step's memory floor (step_bytes / HBM bandwidth)
    and compute floor (GEMM FLOPs at the weight dtype's peak, LM head at bf16's, attention at the
    KV dtype's attention peak): a prediction under a floor, or far above both, is suspect."""
    from contextlib import contextmanager

    from flowc.compiler.model import cost as cost_module
    from flowc.compiler.model.operators import Operators
    from flowc.stdlib_listing import stdlib_spec

    c = STEP_CHECK
    if c["gpu"] not in result["gpus"]:
        return f"decode step check: skipped ({c['gpu']} not fitted in this run)"
    std = stdlib_spec()
    gpu, base = std.gpus[c["gpu"]], std.models[c["model"]]
    link = std.links[gpu.interconnect]
    seqs, keys = c["seqs"], c["seqs"] * c["keys"]
    @contextmanager
    def with_operators(ops):
        # CostModel takes its operators from model.operators.operators(gpu, kernels), of the
        # committed file; hand it these (the fresh fits, the kernel set asked for) while it is built.
        saved = cost_module.operators
        cost_module.operators = lambda *_a, **_k: ops
        try:
            yield
        finally:
            cost_module.operators = saved

    kernel_sets = [DEFAULT_KERNELS] + sorted(result["gpus"][c["gpu"]].get("engines", {}))
    lines = [f"Decode step vs its floors: {c['model']} on {c['gpu']}, {c['seqs']} sequences x {c['keys']} keys "
             "(fresh fits; step = CostModel.step_time, in ms, split into GEMMs, decode attention, other kernels and "
             "engine overhead; floors: step_bytes / bandwidth, FLOPs / peaks)",
             f"{'kernels':<8}{'weights':<9}{'kv':<6}{'step ms':>9}{'gemm':>7}{'attn':>7}{'other':>7}{'ovhd':>7}"
             f"{'mem floor':>11}{'comp floor':>11}{'step/mem':>10}{'step/comp':>10}  kernel sets used"]
    for kernels in kernel_sets:
        for w, kv in c["dtypes"]:
            model = base.model_copy(update={"weights": w, "kv": kv})
            ops = Operators(gpu, kernels, data=result)
            with with_operators(ops):
                cm = cost_module.CostModel(model, gpu, link)
            step = cm.step_time(seqs, 0, seqs, keys)
            parts = cm.breakdown(seqs, 0, seqs, keys)
            mem = cm.step_bytes(seqs, 0, seqs, keys) / gpu.memory_bandwidth
            flops = cm.step_flops(seqs, 0, seqs, keys)
            attn = model.layers * 4.0 * model.heads * model.head_dim * keys
            lm = 2.0 * seqs * model.hidden * model.vocab
            comp = (flops - attn - lm) / ops.gemm_mode(w).peak + lm / ops.gemm_mode("bf16").peak \
                + attn / ops.attn_peak(kv)
            used = ",".join(sorted(set(ops.kernels.values())))
            other = step - parts["gemm"] - parts["attention_decode"] - parts["overhead"]
            lines.append(f"{kernels:<8}{w:<9}{kv:<6}{step * 1e3:>9.2f}{parts['gemm'] * 1e3:>7.2f}"
                         f"{parts['attention_decode'] * 1e3:>7.2f}{other * 1e3:>7.2f}{parts['overhead'] * 1e3:>7.2f}"
                         f"{mem * 1e3:>11.2f}{comp * 1e3:>11.2f}{step / mem:>10.2f}{step / comp:>10.2f}  {used}")
    lines.append("(each row's Operators, of the fresh fits and the kernel set named, are handed to CostModel while "
                 "it is built; engine overhead: the default engine's)")
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
    print()
    print(summary(cal.rows))
    print()
    print(step_check(result))
    if not args.check:
        args.out.write_text(dumps(result) + "\n", encoding="utf-8")
        print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
