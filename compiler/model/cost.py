"""The operator-level cost model: how long one engine iteration takes on one GPU of an instance.

Two layers:

* `Operators(gpu)`: the time of single operators on one GPU (GEMM, prefill and decode
  attention, elementwise kernels, collectives, point-to-point and host transfers). Each is a
  roofline (FLOPs over the GPU's peak for the dtype, bytes over its HBM bandwidth, both from the
  stdlib `spec.GPU`; link bandwidths from `spec.Link`) bent by efficiency curves and latency
  floors fitted on measured kernels (`stdlib/calibration.json`, written by tools/calibrate.py;
  every fit names its source, GPU and software version there).
* `CostModel(model, gpu, link, parallelism)`: a model's iteration on one pipeline stage of a
  TP group, built from those operators; this is what the simulator calls.

The functional forms (identical in tools/calibrate.py, which fits them with numpy):

    s(x; x0, a) = 1 / (1 + (x0 / x)^a)                 saturating in (0, 1)
    comb(tc, tm; p) = (tc^p + tm^p)^(1/p)               smooth max (p = 1: sum, p -> inf: max)

    GEMM       t = t0 + comb(F / (P ec s(m) s(n) s(k) s(F)),  B / (W em s(B) s'(n)); p)
               F = 2mnk, B = m k a + n k w + 2 m n  (a, w: activation and weight bytes)
    prefill    t = t0 + cseq nseq + comb(F / (P ec (d/256)^g s(F) s(hQ) s(pairs/Q)), B / (W em); p)
               F = 2 h (dqk + dv) (pairs + Q tile / 2)   (tile: the causal diagonal's padding)
               B = Q (2 h (dqk + dv) + kv (dqk + dv) kvb),  nseq = max(1, Q^2 / (2 pairs))
    decode     t = t0 + cseq u + comb(F / (P ec), B / (W em s(B) s(u)); p),  u = seqs x kv heads
               F = 4 h d K, B = 2 kv d kvb K + 4 h d seqs  (K: keys read, all sequences)
    collective t = t0 + S_bus / (eff BW) (1 + (S0 / S_bus)^c), S_bus = bytes x 2(n-1)/n (all-reduce)
               or (n-1)/n (all-gather, reduce-scatter, all-to-all); bytes is the whole buffer
    send/recv  t = t0 + bytes / (eff BW) (1 + (S0 / bytes)^c)
    elementwise t = t0 + bytes / (em W)

    overhead   t = step + layer x layers + sequence x rows + (token + layer_token x layers) x tokens
               (gpu `overhead`: engine time beyond the kernels at the device's peaks, measured by
               `flowc calibrate`; zero when not declared);
               `overhead wake` is not per step: the simulator adds it to the first iteration
               after an instance idled (`CostModel.wake_time`)

P is the GPU's dense peak for the compute dtype, W its HBM bandwidth, BW the link's bandwidth
per direction. GPUs without fitted data borrow the curves of the closest calibrated GPU
(`FALLBACK`) as efficiencies relative to their own peaks, and `CostModel.calibrated` is False.

Importing this module is cheap (no numpy); the calibration file is read on first use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from flowc.compiler import spec
from flowc.compiler.model.geometry import ACTIVATION_BYTES, kv_bytes_per_token, kv_heads_per_rank
from flowc.compiler.spec import DTYPE_BYTES

__all__ = ["CostModel", "StreamedCost", "Operators", "Parallelism", "operators", "calibration", "causal_pairs", "FAMILIES"]

# Breakdown families, in the order `CostModel.breakdown` reports them.
FAMILIES = ("gemm", "moe", "attention_prefill", "attention_decode", "elementwise", "embedding", "lm_head",
            "tp_allreduce", "ep_alltoall", "overhead")

# Uncalibrated GPUs borrow the curves of the closest calibrated one (efficiencies are relative
# to each GPU's own peaks, so borrowing keeps the GPU's own FLOP/s and bandwidth):
FALLBACK = {
    "a100-sxm-40g": "a100-sxm-80g",  # same GA100 silicon, HBM2 instead of HBM2e
    "h100-pcie": "h100-sxm",  # same GH100 silicon, lower clocks and power (its own peaks apply)
    "gh200": "h100-sxm",  # the GH200's GPU is an H100 (GH100) with HBM3/HBM3e
    "mi300x": "h200-sxm",  # no AMD data: the calibrated GPU of the nearest class (HBM ~5 TB/s, ~1 PFLOP/s bf16)
}
# Links: fits are per link kind; a kind with no fit on the GPU borrows another GPU's fit of
# that kind, then these (xGMI behaves like a switched NVLink board, Ethernet/RoCE like IB).
LINK_KIND_FALLBACK = {"xgmi": "nvlink", "ethernet": "infiniband"}

# Generic curves for a GPU with no calibrated relative at all (the CPU profile) and for a
# missing calibration file: a plain roofline at fixed efficiencies with a 10 us floor.
# Assumptions, not fits.
GENERIC_GEMM = {"ec": 0.6, "m0": 1.0, "am": 1.0, "n0": 1.0, "an": 1.0, "k0": 1.0, "ak": 1.0, "F0": 1.0, "aF": 1.0,
                "em": 0.7, "B0": 1.0, "aB": 1.0, "nm0": 1.0, "anm": 1.0, "t0": 1e-5, "p": 4.0}
GENERIC_PREFILL = {"ec": 0.4, "g": 0.0, "F0": 1.0, "aF": 1.0, "h0": 1.0, "ah": 1.0, "k0": 1.0, "ak": 1.0, "tile": 0.0,
                   "em": 0.5, "t0": 1e-5, "cseq": 0.0, "p": 4.0}
GENERIC_DECODE = {"ec": 0.3, "em": 0.6, "B0": 1.0, "aB": 1.0, "n0": 1.0, "an": 1.0, "t0": 1e-5, "cseq": 0.0,
                  "p": 4.0}
GENERIC_ELEMENTWISE = {"t0": 5e-6, "em": 0.5}
GENERIC_COLLECTIVE = {"t0": 2e-5, "eff": 0.6, "S0": 1.0, "c": 1.0}
HOST_TRANSFER_EFFICIENCY = 0.8  # pinned-memory copies over PCIe: an assumption, no data here
ELEMENTWISE_OPS = ("norm", "rope", "act", "add", "emb")
COLLECTIVE_OPS = ("allreduce", "allgather", "reducescatter", "alltoall")


# ------------------------------------------------------------------------------------- curves


def _s(x: float, x0: float, a: float) -> float:
    """1 / (1 + (x0/x)^a): ~(x/x0)^a below x0, ~1 above; 0 at x <= 0."""
    if x <= 0.0:
        return 0.0
    return 1.0 / (1.0 + (x0 / x) ** a)


def _comb(tc: float, tm: float, p: float) -> float:
    """Smooth maximum of a compute time and a memory time."""
    if tc <= 0.0:
        return tm
    if tm <= 0.0:
        return tc
    return (tc ** p + tm ** p) ** (1.0 / p)


def gemm_curve(c: dict, m: float, n: float, k: float, flops: float, nbytes: float, peak: float, bw: float) -> float:
    """Seconds of one GEMM kernel from its FLOPs and HBM bytes (the fitted form above).
    `m` is the rows per weight matrix (a grouped GEMM passes rows per active expert)."""
    eff_c = c["ec"] * _s(m, c["m0"], c["am"]) * _s(n, c["n0"], c["an"]) * _s(k, c["k0"], c["ak"]) \
        * _s(flops, c["F0"], c["aF"])
    eff_m = c["em"] * _s(nbytes, c["B0"], c["aB"]) * _s(n, c["nm0"], c["anm"])
    return c["t0"] + _comb(flops / (peak * eff_c), nbytes / (bw * eff_m), c["p"])


def prefill_body(c: dict, q: float, pairs: float, heads: float, kv_heads: float, d_qk: float, d_v: float,
                 kv_bytes: float, peak: float, bw: float) -> float:
    """Seconds of causal attention over `q` new tokens attending `pairs` (query, key) pairs, without
    the kernel floor t0 (a step runs one attention kernel per layer for prefill and decode)."""
    if pairs <= 0.0:
        return 0.0
    q = max(q, 1.0)
    d = d_qk + d_v
    flops = 2.0 * heads * d * (pairs + q * c["tile"] / 2.0)
    nbytes = q * (2.0 * heads * d + kv_heads * d * kv_bytes)
    eff = c["ec"] * (d / 256.0) ** c["g"] * _s(flops, c["F0"], c["aF"]) * _s(heads * q, c["h0"], c["ah"]) \
        * _s(pairs / q, c["k0"], c["ak"])
    nseq = max(1.0, q * q / (2.0 * pairs))
    return c["cseq"] * nseq + _comb(flops / (peak * eff), nbytes / (bw * c["em"]), c["p"])


def decode_body(c: dict, units: float, flops: float, nbytes: float, peak: float, bw: float) -> float:
    """Seconds of decode attention without the floor t0: `units` = sequences x KV heads (the
    kernel's parallel work items), `flops` and `nbytes` over all sequences."""
    if units <= 0.0:
        return 0.0
    eff_m = c["em"] * _s(nbytes, c["B0"], c["aB"]) * _s(units, c["n0"], c["an"])
    return c["cseq"] * units + _comb(flops / (peak * c["ec"]), nbytes / (bw * eff_m), c["p"])


def collective_curve(c: dict, bus_bytes: float, bandwidth: float, cap: bool = True) -> float:
    """Seconds of a collective or transfer moving `bus_bytes` over a link of `bandwidth`. With
    `cap`, the fitted efficiency is capped at 1: a fit never makes a declared link faster than
    its bandwidth (vidur's cross-node send/recv ran faster than one NIC: several rails)."""
    if bus_bytes <= 0.0:
        return 0.0
    eff = min(c["eff"], 1.0) if cap else c["eff"]
    return c["t0"] + bus_bytes / (eff * bandwidth) * (1.0 + (c["S0"] / bus_bytes) ** c["c"])


# ------------------------------------------------------------------------------- calibration


@lru_cache(maxsize=1)
def calibration() -> dict:
    """The fitted constants (stdlib/calibration.json); empty when the file is absent."""
    from importlib import resources

    try:
        text = resources.files("flowc.stdlib").joinpath("calibration.json").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        return {}
    return json.loads(text)


def _bus_factor(op: str, n: int) -> float:
    return 2.0 * (n - 1) / n if op == "allreduce" else (n - 1) / n


@dataclass(frozen=True)
class GemmMode:
    """How a GEMM with some weight dtype runs on a GPU: the fitted curve, the peak it is relative
    to, and the bytes per activation and weight element. `weight_only`: the GPU has no tensor
    cores for the weight dtype (fp8 on A100, int4 anywhere): bf16 math on dequantized weights,
    weight bytes of the stored dtype (dequantization cost not modelled)."""

    curve: str
    peak: float
    act_bytes: float
    weight_bytes: float
    weight_only: bool


class Operators:
    """Operator times on one GPU. Efficiencies come from the GPU's own fits, or the closest
    calibrated GPU's (`FALLBACK`), or generic defaults; `calibrated` says which."""

    def __init__(self, gpu: spec.GPU):
        self.gpu = gpu
        self.bw = gpu.memory_bandwidth
        cal = calibration().get("gpus", {})
        own = cal.get(gpu.name)
        self.calibrated = own is not None and bool(own.get("gemm"))
        if own is None:
            borrowed = FALLBACK.get(gpu.name)
            if borrowed is None and gpu.vendor == "nvidia" and cal:
                # an NVIDIA GPU the table does not name: the calibrated one nearest in HBM bandwidth
                bw = gpu.memory_bandwidth
                borrowed = min(cal, key=lambda name: abs(math.log(cal[name]["memory_bandwidth"] / bw)))
            if borrowed is None and gpu.vendor == "amd" and cal:
                borrowed = FALLBACK["mi300x"]
            self.base_name = borrowed if borrowed in cal else None
        else:
            self.base_name = gpu.name
        self.fits = cal.get(self.base_name, {}) if self.base_name else {}
        self._all = cal
        self.calibration_source = self._describe()

    # -- bookkeeping
    def _describe(self) -> str:
        if not self.fits:
            return f"{self.gpu.name}: uncalibrated, generic roofline efficiencies (no calibration data)"
        sources = calibration().get("sources", {})

        def name(source_id: str) -> str:
            s = sources.get(source_id, {})
            return f"{s.get('project', source_id)} {s.get('software', '')}".strip()

        used = dict.fromkeys(name(f["source"]) for fam in ("gemm", "attention_prefill", "attention_decode")
                             for f in self.fits.get(fam, {}).values())
        text = ", ".join(used)
        if self.base_name != self.gpu.name:
            return (f"{self.gpu.name}: uncalibrated, efficiency curves borrowed from {self.base_name} ({text}) "
                    "applied to its own peaks")
        borrowed = self.fits.get("borrowed", {})
        extra = "".join(f"; {fam} from {src}" for fam, src in sorted(borrowed.items()))
        return f"{self.gpu.name}: calibrated on {text}{extra}"

    def _peak(self, dtype: str) -> float:
        flops = self.gpu.flops
        if dtype in flops:
            return flops[dtype]
        for alt in ("bf16", "fp16", "fp32"):
            if alt in flops:
                return flops[alt]
        raise ValueError(f"GPU {self.gpu.name} declares no FLOP/s")

    def _fit(self, family: str, key: str, generic: dict) -> dict:
        fam = self.fits.get(family, {})
        if key in fam:
            return fam[key]["params"]
        if fam:  # nearest key of the family (e.g. fp8 KV on a GPU measured in bf16 only)
            return next(iter(fam.values()))["params"]
        if self.gpu.vendor == "cpu":
            # a CPU profile states achieved FLOP/s and bandwidth (what `flowc calibrate`
            # measures), not datasheet peaks: apply them at full efficiency
            return {**generic, **{k: 1.0 for k in ("ec", "em", "eff") if k in generic}}
        return generic

    # -- GEMM
    def gemm_mode(self, dtype: str, *, block_scaled: bool = False) -> GemmMode:
        """W8A8 fp8 where the GPU has an fp8 peak (block-scaled fp8 for DeepSeek-style
        checkpoints when fitted), fp4 where it has an fp4 peak, int8 where it has an int8 peak
        (on the fp8 curve, or bf16's if none); otherwise weight-only on the bf16 curve."""
        gemm = self.fits.get("gemm", {})
        flops = self.gpu.flops
        wb = DTYPE_BYTES[dtype]
        if dtype in ("bf16", "fp16"):
            return GemmMode("bf16", self._peak(dtype), 2.0, 2.0, False)
        if dtype == "fp32":
            return GemmMode("bf16", self._peak("fp32"), 4.0, 4.0, False)
        if dtype == "fp8" and "fp8" in flops:
            curve = "fp8_block" if block_scaled and "fp8_block" in gemm else "fp8"
            return GemmMode(curve, flops["fp8"], 1.0, 1.0, False)
        if dtype == "fp4" and "fp4" in flops:
            return GemmMode("fp4" if "fp4" in gemm else "fp8", flops["fp4"], 0.5, 0.5, False)
        if dtype == "int8" and "int8" in flops:
            return GemmMode("fp8" if "fp8" in gemm else "bf16", flops["int8"], 1.0, 1.0, False)
        return GemmMode("bf16", self._peak("bf16"), 2.0, wb, True)

    def gemm_counts(self, mode: GemmMode, m: float, n: float, k: float, groups: float = 1.0) -> tuple[float, float]:
        """(FLOPs, HBM bytes) of an m x k by k x n GEMM, or of `groups` weight matrices
        sharing m rows in all (a grouped MoE GEMM): F = 2mnk, B = m k a + groups n k w + 2 m n."""
        return 2.0 * m * n * k, m * k * mode.act_bytes + groups * n * k * mode.weight_bytes + m * n * ACTIVATION_BYTES

    def gemm_mode_time(self, mode: GemmMode, m: float, n: float, k: float, groups: float = 1.0) -> float:
        if m <= 0.0:
            return 0.0
        flops, nbytes = self.gemm_counts(mode, m, n, k, groups)
        curve = self._fit("gemm", mode.curve, GENERIC_GEMM)
        return gemm_curve(curve, m / max(groups, 1.0), n, k, flops, nbytes, mode.peak, self.bw)

    def gemm_time(self, m: float, n: float, k: float, dtype: str = "bf16") -> float:
        """Seconds of y[m, n] = x[m, k] @ W[k, n] with weights in `dtype` (activations bf16, or
        fp8/fp4 quantized for W8A8 / W4A4). FLOPs 2mnk; bytes m k a + n k w + 2 m n."""
        return self.gemm_mode_time(self.gemm_mode(dtype), m, n, k)

    # -- attention
    def _attn_peak(self, kv_dtype: str = "bf16") -> float:
        """Attention fits are relative to the bf16 peak, or the fp8 peak with an fp8 KV cache on a
        GPU that has one (the kernels then compute in fp8; vLLM quantizes the query too)."""
        return self.gpu.flops["fp8"] if kv_dtype == "fp8" and "fp8" in self.gpu.flops else self._peak("bf16")

    def attention_prefill_time(self, chunks, heads: int, kv_heads: int, head_dim: int, kv_dtype: str = "bf16", *,
                               v_head_dim: Optional[int] = None, window: Optional[int] = None) -> float:
        """Seconds of causal prefill attention for `chunks`, an iterable of (new_tokens,
        past_tokens) per sequence: query i of a chunk attends past + i + 1 keys, at most
        `window` (sliding window). FLOPs 2 h (dqk + dv) per (query, key) pair; bytes: Q and O of
        the new tokens and their K/V (the cache re-reads of flash attention are not counted)."""
        q = pairs = 0
        for new, past in chunks:
            q += new
            pairs += causal_pairs(new, past, window)
        c = self._fit("attention_prefill", kv_dtype, GENERIC_PREFILL)
        body = prefill_body(c, q, pairs, heads, kv_heads, head_dim, v_head_dim or head_dim, DTYPE_BYTES[kv_dtype],
                            self._attn_peak(kv_dtype), self.bw)
        return c["t0"] + body if pairs else 0.0

    def attention_decode_time(self, seqs: int, kv_tokens_total: int, heads: int, kv_heads: int, head_dim: int,
                              kv_dtype: str = "bf16") -> float:
        """Seconds of decode attention: `seqs` sequences, one new token each, reading
        `kv_tokens_total` cached tokens in all (cap each at the sliding window first).
        FLOPs 4 h d K; bytes 2 kv d kvb K (K and V) + 4 h d seqs (q in, o out, bf16)."""
        if seqs <= 0:
            return 0.0
        c = self._fit("attention_decode", kv_dtype, GENERIC_DECODE)
        flops = 4.0 * heads * head_dim * kv_tokens_total
        nbytes = 2.0 * kv_heads * head_dim * DTYPE_BYTES[kv_dtype] * kv_tokens_total + 4.0 * heads * head_dim * seqs
        return c["t0"] + decode_body(c, seqs * kv_heads, flops, nbytes, self._attn_peak(kv_dtype), self.bw)

    # -- elementwise
    def elementwise_time(self, nbytes: float, op: str = "add") -> float:
        """Seconds of one memory-bound kernel moving `nbytes` (read + write): op is one of
        norm (RMSNorm/LayerNorm), rope, act (SiLU-and-mul, GELU), add (residual, copies), emb."""
        if nbytes <= 0:
            return 0.0
        c = self.fits.get("elementwise", {}).get(op, {}).get("params", GENERIC_ELEMENTWISE)
        return c["t0"] + nbytes / (c["em"] * self.bw)

    # -- collectives
    def _collective_params(self, kind: str, op: str, n: int) -> dict:
        coll = self._kind_fits("collectives", kind)
        fits = coll.get(op) or coll.get("allreduce") if coll else None
        if not fits:
            return GENERIC_COLLECTIVE
        measured = sorted((int(k), v["params"]) for k, v in fits.items())
        if n <= measured[0][0]:
            return measured[0][1]
        if n >= measured[-1][0]:
            top_n, top = measured[-1]
            # beyond the largest measured group: same bus efficiency, floor grows with log2(n)
            return {**top, "t0": top["t0"] * math.log2(n) / math.log2(top_n)}
        for (n0, p0), (n1, p1) in zip(measured, measured[1:]):
            if n0 <= n <= n1:
                w = (math.log2(n) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
                return {key: p0[key] * (p1[key] / p0[key]) ** w for key in p0}  # geometric interpolation
        return measured[-1][1]

    def _kind_fits(self, family: str, kind: str) -> dict:
        """A GPU's fits of a link kind, else any calibrated GPU's fits of that kind (links
        behave alike across GPUs once scaled by their bandwidth), else the related kind's."""
        for k in (kind, LINK_KIND_FALLBACK.get(kind)):
            if k is None:
                continue
            own = self.fits.get(family, {}).get(k)
            if own:
                return own
            for name in sorted(self._all):
                other = self._all[name].get(family, {}).get(k)
                if other:
                    return other
        return {}

    def collective_time(self, op: str, nbytes: float, n_gpus: int, link: spec.Link) -> float:
        if n_gpus <= 1 or nbytes <= 0:
            return 0.0
        c = self._collective_params(link.kind, op, n_gpus)
        if c is GENERIC_COLLECTIVE and link.latency:
            c = {**c, "t0": link.latency * 2 * math.ceil(math.log2(n_gpus)) + 5e-6}
        return collective_curve(c, nbytes * _bus_factor(op, n_gpus), link.bandwidth)

    def allreduce_time(self, nbytes: float, n_gpus: int, link: spec.Link) -> float:
        """All-reduce of an `nbytes` buffer on each of n GPUs (ring bus bytes 2(n-1)/n x nbytes)."""
        return self.collective_time("allreduce", nbytes, n_gpus, link)

    def allgather_time(self, nbytes: float, n_gpus: int, link: spec.Link) -> float:
        """All-gather into an `nbytes` output buffer on each GPU (bus bytes (n-1)/n x nbytes)."""
        return self.collective_time("allgather", nbytes, n_gpus, link)

    def reducescatter_time(self, nbytes: float, n_gpus: int, link: spec.Link) -> float:
        """Reduce-scatter of an `nbytes` input buffer on each GPU (bus bytes (n-1)/n x nbytes)."""
        return self.collective_time("reducescatter", nbytes, n_gpus, link)

    def alltoall_time(self, nbytes: float, n_gpus: int, link: spec.Link) -> float:
        """All-to-all of an `nbytes` send buffer per GPU ((n-1)/n of it leaves the GPU)."""
        return self.collective_time("alltoall", nbytes, n_gpus, link)

    def sendrecv_time(self, nbytes: float, link: spec.Link) -> float:
        """Point-to-point transfer of `nbytes` from one GPU to another over `link`."""
        if nbytes <= 0:
            return 0.0
        fit = self._kind_fits("sendrecv", link.kind)
        if fit:
            return collective_curve(fit["params"], nbytes, link.bandwidth)
        return (link.latency or 5e-6) + 5e-6 + nbytes / (GENERIC_COLLECTIVE["eff"] * link.bandwidth)

    def host_transfer_time(self, nbytes: float, host_link: spec.Link) -> float:
        """Copy of `nbytes` between host memory and the GPU over `host_link` (uncalibrated:
        the link's latency plus bytes at HOST_TRANSFER_EFFICIENCY of its bandwidth)."""
        if nbytes <= 0:
            return 0.0
        return (host_link.latency or 5e-6) + nbytes / (HOST_TRANSFER_EFFICIENCY * host_link.bandwidth)


@lru_cache(maxsize=64)
def _operators_cached(gpu_json: str) -> Operators:
    return Operators(spec.GPU.model_validate_json(gpu_json))


def operators(gpu: spec.GPU) -> Operators:
    """Operators of a GPU, shared between cost models of the same GPU."""
    return _operators_cached(gpu.model_dump_json())


def causal_pairs(new: int, past: int, window: Optional[int] = None) -> int:
    """(query, key) pairs of a causal prefill chunk: query i (0-based) attends past + i + 1 keys,
    at most `window`. Without a window: new x past + new (new + 1) / 2."""
    if new <= 0:
        return 0
    if window is None or past + new <= window:
        return new * past + new * (new + 1) // 2
    # queries whose key count is still below the window, then the rest at the window
    below = max(0, min(new, window - past - 1))  # i with past + i + 1 < window
    return below * past + below * (below + 1) // 2 + (new - below) * window


# ----------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    ep: int = 1


# Token grid for step_time: exact nodes up to _EXACT, then _PER_OCTAVE log-spaced nodes per
# doubling up to _TOP tokens, linear interpolation in between (< 0.1% off the exact sum).
_EXACT = 64
_PER_OCTAVE = 16
_TOP = 1 << 22


class CostModel:
    """Seconds of one engine iteration on one pipeline stage of a TP group (what the simulator asks).

    Work split and conventions (per GPU of the stage, i.e. per TP rank):
    * Layers, embedding and LM head are all split evenly over the pp stages: a stage is charged
      layers/pp layers (dense and MoE layers in the model's proportion) plus 1/pp of the
      embedding and LM head. Summed over stages this is the model's iteration exactly (request
      latency is right); the real last stage is slower by (1 - 1/pp) of the LM head.
    * TP: heads, FFN columns and vocabulary split over tp; KV heads split, or one replicated
      per rank when tp > kv_heads (geometry.kv_heads_per_rank); MLA's latent projections and
      cache are replicated. Two all-reduces of the hidden state per layer (after attention and
      after the MLP/MoE), one after the vocab-parallel embedding, and a gather of the logits.
    * MoE (G = max(tp, ep) GPUs hold the experts: E/ep whole experts per group of G/ep ranks,
      each expert's FFN split G/ep ways). With ep <= tp the tokens are already on every rank
      (TP attention): each rank runs its experts on the tokens routed to them and the layer's
      all-reduce combines them, no all-to-all (vLLM/SGLang EP without attention DP). With
      ep > tp the stage is one of ep/tp attention data-parallel groups, all with this step's
      load: tokens are dispatched to and combined from their experts by two all-to-alls per
      layer over `intra_link`. Routing is balanced; the expected number of experts hit by T
      tokens is E (1 - (1 - top_k/E)^T), and only their weights are read.
    * MLA (DeepSeek): prefill attention in the decompressed form (MHA over h heads, q/k width
      qk_nope + qk_rope, v width v_head_dim; the latents of the new tokens are expanded by the
      kv_b projection); decode in the absorbed form over the cached latent of width
      kv_lora + qk_rope: 2 h (kv_lora + qk_rope + kv_lora) FLOPs per (head, key) for scores and
      the latent-weighted sum, and (kv_lora + qk_rope) x kv bytes read per key. The absorbed
      W_UK / W_UV products cost what the kv_b projection does (2 h kv_lora (nope + v) FLOPs per
      token), so every token is charged the kv_b GEMM. Past-context latents re-expanded by
      later prefill chunks are not counted.
    * LM head: logits only for `decode_seqs + (1 if prefill_attn_pairs else 0)` rows (the
      decodes and, approximately, one finishing prefill); the final norm runs on all tokens.
    * prefill_attn_pairs is the causal count: a chunk of q new tokens after c cached ones has
      q c + q (q + 1) / 2 pairs (`prefill_pairs` computes it, with the sliding window).
      decode_kv_tokens counts keys read, new token included, each capped at the sliding window
      (`decode_keys`).
    * Attention runs one kernel per layer for the whole batch: its floor is charged once per
      layer, prefill and decode bodies add up.
    * TP/EP collectives use `intra_link`; pipeline hops and KV transfers use `inter_link` when
      given, else `intra_link`.
    """

    def __init__(self, model: spec.Model, gpu: spec.GPU, intra_link: spec.Link, *,
                 parallelism: Parallelism = Parallelism(), inter_link: Optional[spec.Link] = None):
        self.model, self.gpu, self.intra_link, self.inter_link = model, gpu, intra_link, inter_link
        self.parallelism = p = parallelism
        if min(p.tp, p.pp, p.ep) < 1:
            raise ValueError(f"parallelism degrees must be >= 1, got {p}")
        self.ops = ops = operators(gpu)
        self.calibrated = ops.calibrated
        self.calibration_source = ops.calibration_source
        m = model
        tp = p.tp
        self._hop_link = inter_link or intra_link

        # ---- shapes per rank
        self.heads_r = m.heads / tp
        self.kv_r = kv_heads_per_rank(m, tp)
        self._wmode = ops.gemm_mode(m.weights, block_scaled=m.architecture == "deepseek_v3")
        self._bf16 = ops.gemm_mode("bf16")
        kvb = DTYPE_BYTES[m.kv]
        self._layer_share = m.layers / p.pp
        # engine time beyond the kernels (gpu `overhead`): per step and layer, per sequence, per token
        # (of the step, and in every layer)
        o = gpu.overheads
        self._overhead = (o.get("step", 0.0) + o.get("layer", 0.0) * self._layer_share, o.get("sequence", 0.0),
                          o.get("token", 0.0) + o.get("layer_token", 0.0) * self._layer_share)
        self.wake_time = o.get("wake", 0.0)
        if m.moe is not None:
            self._moe_share = (m.layers - m.moe.dense_layers) / p.pp
            self._dense_share = m.moe.dense_layers / p.pp
        else:
            self._moe_share, self._dense_share = 0.0, self._layer_share

        # projections of every layer: (n, k) at the weight dtype; m = tokens
        h, hr = m.hidden, self.heads_r
        if m.mla is not None:
            a = m.mla
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            self._proj = []
            if a.q_lora_rank:
                # q_a and kv_a fused, replicated on every rank; q_b split by heads
                self._proj.append((a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim, h))
                self._proj.append((hr * qk, a.q_lora_rank))
            else:
                self._proj.append((hr * qk, h))
                self._proj.append((a.kv_lora_rank + a.qk_rope_head_dim, h))
            self._proj.append((hr * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank))  # kv_b / absorbed
            self._proj.append((h, hr * a.v_head_dim))  # o_proj
            # attention counts
            self._pf_dims = (hr, hr, qk, a.v_head_dim)  # heads, kv heads (decompressed MHA), dqk, dv
            latent = a.kv_lora_rank + a.qk_rope_head_dim
            self._dec_flops_per_key = 2.0 * hr * (latent + a.kv_lora_rank)
            self._dec_bytes_per_key = latent * kvb
            self._dec_bytes_per_seq = 4.0 * hr * latent  # q and o in latent space, bf16
            self._dec_units_per_seq = 1.0
            self._kv_write_per_token = latent * kvb
            self._rope_width = (hr + 1) * a.qk_rope_head_dim
            self._extra_norm_width = (a.q_lora_rank or 0) + a.kv_lora_rank
        else:
            d = m.head_dim
            self._proj = [((hr + 2 * self.kv_r) * d, h), (h, hr * d)]
            self._pf_dims = (hr, self.kv_r, d, d)
            self._dec_flops_per_key = 4.0 * hr * d
            self._dec_bytes_per_key = 2.0 * self.kv_r * d * kvb
            self._dec_bytes_per_seq = 4.0 * hr * d
            self._dec_units_per_seq = float(self.kv_r)
            self._kv_write_per_token = 2.0 * self.kv_r * d * kvb
            self._rope_width = (hr + self.kv_r) * d
            self._extra_norm_width = 0
        self._kv_bytes = kvb
        self._attn_peak = ops._attn_peak(m.kv)
        self._pf_curve = ops._fit("attention_prefill", m.kv, GENERIC_PREFILL)
        self._dec_curve = ops._fit("attention_decode", m.kv, GENERIC_DECODE)

        # MoE geometry
        if m.moe is not None:
            e = m.moe
            G = max(tp, p.ep)
            self._moe_G = G
            self._moe_ffn_r = e.expert_ffn / (G / p.ep)
            self._experts_local = e.experts / p.ep
        # caches
        self._tok_cache: dict[int, float] = {}
        self._lm_cache: dict[int, float] = {}
        self._nodes: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ token-dependent work

    def _token_ops(self, T: float) -> list[tuple[str, float, float, float]]:
        """(family, seconds, FLOPs, bytes) of everything in the stage whose cost depends only on
        the step's token count T: projections, MLPs and MoE, elementwise kernels, the embedding,
        the final norm and the TP/EP collectives; layer shares already applied."""
        m, ops, p = self.model, self.ops, self.parallelism
        out: list[tuple[str, float, float, float]] = []
        if T <= 0:
            return out
        ab = ACTIVATION_BYTES
        wm = self._wmode

        def gemm(family: str, share: float, n: float, k: float, mode=wm, rows: float = T, groups: float = 1.0):
            if share <= 0 or rows <= 0:
                return
            f, b = ops.gemm_counts(mode, rows, n, k, groups)
            out.append((family, share * ops.gemm_mode_time(mode, rows, n, k, groups), share * f, share * b))

        def ew(family: str, share: float, nbytes: float, op: str):
            if share > 0 and nbytes > 0:
                out.append((family, share * ops.elementwise_time(nbytes, op), 0.0, share * nbytes))

        L = self._layer_share
        for n, k in self._proj:
            gemm("gemm", L, n, k)
        # dense MLPs
        ffn_r = m.ffn / p.tp
        if m.mlp == "gated":
            gemm("gemm", self._dense_share, 2 * ffn_r, m.hidden)
            act_bytes = 3 * ffn_r * ab
        else:
            gemm("gemm", self._dense_share, ffn_r, m.hidden)
            act_bytes = 2 * ffn_r * ab
        gemm("gemm", self._dense_share, m.hidden, ffn_r)
        ew("elementwise", self._dense_share, T * act_bytes, "act")
        # MoE layers
        if m.moe is not None and self._moe_share > 0:
            e, S = m.moe, self._moe_share
            gemm("moe", S, e.experts, m.hidden, mode=self._bf16)  # router, replicated, 16-bit
            group_tokens = T * self._moe_G / p.tp
            active = self._experts_local * (1.0 - (1.0 - e.top_k / e.experts) ** group_tokens)
            rows = group_tokens * e.top_k / p.ep  # assignments landing on this rank's experts
            fr = self._moe_ffn_r
            gemm("moe", S, 2 * fr, m.hidden, rows=rows, groups=active)
            gemm("moe", S, m.hidden, fr, rows=rows, groups=active)
            ew("elementwise", S, rows * 3 * fr * ab, "act")
            if e.shared_experts:
                sf = e.shared_experts * e.expert_ffn / p.tp
                gemm("moe", S, 2 * sf, m.hidden)
                gemm("moe", S, m.hidden, sf)
                ew("elementwise", S, T * 3 * sf * ab, "act")
            if p.ep > p.tp:
                buf = T * e.top_k * m.hidden * ab / p.tp
                t = 2 * ops.alltoall_time(buf, p.ep, self.intra_link)
                out.append(("ep_alltoall", S * t, 0.0, 0.0))
        # elementwise of every layer: fused add+norm(s), rope, KV-cache write, MLA's latent norms
        norms = 1 if m.architecture == "gptj" else 2
        ew("elementwise", L * norms, T * 4 * m.hidden * ab, "norm")
        ew("elementwise", L, T * 2 * self._rope_width * ab, "rope")
        ew("elementwise", L, T * self._kv_write_per_token, "add")
        if self._extra_norm_width:
            ew("elementwise", L, T * 2 * self._extra_norm_width * ab, "norm")
        # TP all-reduces: two per layer
        if p.tp > 1:
            t = ops.allreduce_time(T * m.hidden * ab, p.tp, self.intra_link)
            out.append(("tp_allreduce", 2 * L * t, 0.0, 0.0))
        # embedding (vocab-parallel gather + all-reduce) and final norm, 1/pp of them
        share = 1.0 / p.pp
        ew("embedding", share, T * 2 * m.hidden * ab, "emb")
        if p.tp > 1:
            out.append(("embedding", share * ops.allreduce_time(T * m.hidden * ab, p.tp, self.intra_link), 0.0, 0.0))
        ew("elementwise", share, T * 4 * m.hidden * ab, "norm")
        return out

    def _lm_ops(self, rows: float) -> list[tuple[str, float, float, float]]:
        """LM head (16-bit, vocab split over TP) and the logits gather, 1/pp of them."""
        if rows <= 0:
            return []
        m, ops, p = self.model, self.ops, self.parallelism
        share = 1.0 / p.pp
        n = m.vocab / p.tp
        f, b = ops.gemm_counts(self._bf16, rows, n, m.hidden)
        out = [("lm_head", share * ops.gemm_mode_time(self._bf16, rows, n, m.hidden), share * f, share * b)]
        if p.tp > 1:
            out.append(("lm_head", share * ops.allgather_time(rows * m.vocab * ACTIVATION_BYTES, p.tp,
                                                              self.intra_link), 0.0, 0.0))
        return out

    def _node(self, i: int) -> dict[str, float]:
        """Per-family seconds at grid node i (lazily computed)."""
        node = self._nodes.get(i)
        if node is None:
            node = dict.fromkeys(FAMILIES, 0.0)
            for family, t, _, _ in self._token_ops(self._node_tokens(i)):
                node[family] += t
            node["_total"] = sum(node[f] for f in FAMILIES)
            self._nodes[i] = node
        return node

    @staticmethod
    def _node_tokens(i: int) -> float:
        return float(i) if i <= _EXACT else _EXACT * 2.0 ** ((i - _EXACT) / _PER_OCTAVE)

    def _token_families(self, tokens: int) -> dict[str, float]:
        if tokens <= _EXACT:
            return self._node(tokens)
        if tokens >= _TOP:
            out = dict.fromkeys(FAMILIES, 0.0)
            for family, t, _, _ in self._token_ops(tokens):
                out[family] += t
            out["_total"] = sum(out[f] for f in FAMILIES)
            return out
        x = _EXACT + _PER_OCTAVE * math.log2(tokens / _EXACT)
        i = int(x)
        lo, hi = self._node(i), self._node(i + 1)
        t0, t1 = self._node_tokens(i), self._node_tokens(i + 1)
        w = (tokens - t0) / (t1 - t0)
        return {f: lo[f] + w * (hi[f] - lo[f]) for f in lo}

    def _tok_time(self, tokens: int) -> float:
        t = self._token_families(tokens)["_total"]
        self._tok_cache[tokens] = t
        return t

    def _lm_time(self, rows: int) -> float:
        t = sum(x[1] for x in self._lm_ops(rows))
        self._lm_cache[rows] = t
        return t

    # ----------------------------------------------------------------------------- attention

    def _attention(self, prefill_tokens: int, pairs: int, seqs: int, kv_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of the stage's attention; the kernel floor is charged
        once per layer, to decode when there is any, else to prefill."""
        pf = dec = 0.0
        if pairs > 0:
            heads, kvh, dqk, dv = self._pf_dims
            pf = prefill_body(self._pf_curve, prefill_tokens, pairs, heads, kvh, dqk, dv, self._kv_bytes,
                              self._attn_peak, self.ops.bw)
        if seqs > 0:
            dec = decode_body(self._dec_curve, seqs * self._dec_units_per_seq, self._dec_flops_per_key * kv_tokens,
                              self._dec_bytes_per_key * kv_tokens + self._dec_bytes_per_seq * seqs,
                              self._attn_peak, self.ops.bw) + self._dec_curve["t0"]
        elif pairs > 0:
            pf += self._pf_curve["t0"]
        L = self._layer_share
        return L * pf, L * dec

    # ---------------------------------------------------------------------------- public API

    def step_time(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Seconds for ONE pipeline stage (see the class docstring for the split) to run one engine
        iteration on its TP group. tokens: all tokens of the step (prefill chunks + one per
        decoding sequence); prefill_attn_pairs: causal (query, key) pairs of the prefill chunks;
        decode_seqs, decode_kv_tokens: decoding sequences and the keys they read in all.
        O(1): token-only work comes from a lazily filled grid, attention is a closed form."""
        if tokens <= 0:
            return 0.0
        t = self._tok_cache.get(tokens)
        if t is None:
            t = self._tok_time(tokens)
        rows = decode_seqs + 1 if prefill_attn_pairs else decode_seqs
        if rows:
            lm = self._lm_cache.get(rows)
            t += lm if lm is not None else self._lm_time(rows)
        # attention, inlined from _attention for speed
        a = 0.0
        if prefill_attn_pairs > 0:
            c = self._pf_curve
            q = tokens - decode_seqs
            if q < 1:
                q = 1
            heads, kvh, dqk, dv = self._pf_dims
            a = prefill_body(c, q, prefill_attn_pairs, heads, kvh, dqk, dv, self._kv_bytes, self._attn_peak,
                             self.ops.bw)
            if not decode_seqs:
                a += c["t0"]
        if decode_seqs > 0:
            c = self._dec_curve
            a += c["t0"] + decode_body(c, decode_seqs * self._dec_units_per_seq,
                                       self._dec_flops_per_key * decode_kv_tokens,
                                       self._dec_bytes_per_key * decode_kv_tokens
                                       + self._dec_bytes_per_seq * decode_seqs, self._attn_peak, self.ops.bw)
        o_step, o_seq, o_tok = self._overhead
        return t + a * self._layer_share + o_step + o_seq * rows + o_tok * tokens

    def breakdown(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int,
                  decode_kv_tokens: int) -> dict[str, float]:
        """Seconds per operator family (FAMILIES) for the same step; sums to step_time."""
        out = dict.fromkeys(FAMILIES, 0.0)
        if tokens <= 0:
            return out
        fam = self._token_families(tokens)
        for f in FAMILIES:
            out[f] += fam[f]
        rows = decode_seqs + 1 if prefill_attn_pairs else decode_seqs
        for family, t, _, _ in self._lm_ops(rows):
            out[family] += t
        pf, dec = self._attention(max(tokens - decode_seqs, 1), prefill_attn_pairs, decode_seqs, decode_kv_tokens)
        out["attention_prefill"] += pf
        out["attention_decode"] += dec
        o_step, o_seq, o_tok = self._overhead
        out["overhead"] = o_step + o_seq * rows + o_tok * tokens
        return out

    def _counts(self, tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens) -> tuple[float, float]:
        ops = self._token_ops(tokens) + self._lm_ops(decode_seqs + 1 if prefill_attn_pairs else decode_seqs)
        flops = sum(x[2] for x in ops)
        nbytes = sum(x[3] for x in ops)
        L = self._layer_share
        if prefill_attn_pairs > 0:
            heads, kvh, dqk, dv = self._pf_dims
            q = max(tokens - decode_seqs, 1)
            flops += L * 2.0 * heads * (dqk + dv) * prefill_attn_pairs
            nbytes += L * q * (2.0 * heads * (dqk + dv) + kvh * (dqk + dv) * self._kv_bytes)
        if decode_seqs > 0:
            flops += L * self._dec_flops_per_key * decode_kv_tokens
            nbytes += L * (self._dec_bytes_per_key * decode_kv_tokens + self._dec_bytes_per_seq * decode_seqs)
        return flops, nbytes

    def step_flops(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Matrix FLOPs one GPU of the stage executes in the step: GEMMs (2mnk; MoE experts at
        their routed rows) and attention (2 h (dqk + dv) per prefill pair, 4 h d per decode key,
        MLA absorbed: 2 h (2 kv_lora + rope) per key). Elementwise FLOPs are not counted;
        attention padding (`tile`) is not a FLOP."""
        return self._counts(tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens)[0]

    def step_bytes(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """HBM bytes one GPU of the stage moves in the step, as the model counts them: weights of
        every GEMM read once (MoE: experts hit only), GEMM activations in and out, KV read by
        decode, Q/O/new K/V of prefill, and the elementwise kernels' reads and writes."""
        return self._counts(tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens)[1]

    def pp_hop_time(self, tokens: int) -> float:
        """Activation send between two pipeline stages: tokens x hidden x 2 bytes, every TP rank
        sending its copy in parallel over `inter_link` (else `intra_link`)."""
        if tokens <= 0 or self.parallelism.pp <= 1:
            return 0.0
        return self.ops.sendrecv_time(tokens * self.model.hidden * ACTIVATION_BYTES, self._hop_link)

    def kv_bytes_per_gpu(self, tokens: int) -> float:
        """KV-cache bytes of `tokens` tokens that one GPU of the instance sends in a transfer: the
        model's KV (geometry.kv_bytes_per_token) split over the tp x pp GPUs, which send in
        parallel (replicated KV heads and MLA's replicated latent are sent once)."""
        p = self.parallelism
        return tokens * kv_bytes_per_token(self.model) / (p.tp * p.pp)

    def kv_transfer_time(self, tokens: int, link: Optional[spec.Link] = None) -> float:
        """Moving `tokens` tokens of KV cache between instances (prefill -> decode): every GPU sends
        its share in parallel over `link` (default: inter_link, else intra_link)."""
        if tokens <= 0:
            return 0.0
        return self.ops.sendrecv_time(self.kv_bytes_per_gpu(tokens), link or self._hop_link)

    def host_transfer_time(self, nbytes: float, host_link: spec.Link) -> float:
        """Copy of `nbytes` between this GPU and host memory (KV offload) over `host_link`
        (the stdlib GPU names it: `spec.links[gpu.host_link]`)."""
        return self.ops.host_transfer_time(nbytes, host_link)

    def prefill_pairs(self, new_tokens: int, past_tokens: int = 0) -> int:
        """The causal pair count of one prefill chunk for this model (sliding window applied)."""
        return causal_pairs(new_tokens, past_tokens, self.model.sliding_window)

    def decode_keys(self, context: int) -> int:
        """Keys one decoding sequence reads with `context` tokens cached (new token included)."""
        w = self.model.sliding_window
        return min(context, w) if w else context


@dataclass(frozen=True)
class StreamedCost:
    """A step cost plus the seconds that streaming offloaded weights from host memory adds to
    every iteration (the offload LP's overhead, recorded in a plan as MemoryMap.offload_step_s).
    The overhead is constant per iteration: the streamed bytes do not depend on the batch, and
    a larger batch hides a little more of the transfer, so prefill-heavy iterations are charged
    slightly more than they take. Everything else is the base cost model's."""

    base: "CostModel"
    overhead: float

    def step_time(self, tokens: int, prefill_attn_pairs: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        return self.base.step_time(tokens, prefill_attn_pairs, decode_seqs, decode_kv_tokens) + self.overhead

    def prefill_pairs(self, new_tokens: int, past_tokens: int) -> int:
        return self.base.prefill_pairs(new_tokens, past_tokens)

    @property
    def wake_time(self) -> float:
        return self.base.wake_time

    def pp_hop_time(self, tokens: int) -> float:
        return self.base.pp_hop_time(tokens)

    def kv_transfer_time(self, tokens: int) -> float:
        return self.base.kv_transfer_time(tokens)
