"""The operators of one GPU: the time of single operators (GEMM, prefill and decode attention,
elementwise kernels, collectives, point-to-point and host transfers). Each is a roofline
(FLOPs over the GPU's peak for the dtype, bytes over its HBM bandwidth, both from the stdlib
`spec.GPU`; link bandwidths from `spec.Link`) bent by efficiency curves and latency floors
fitted on measured kernels (`stdlib/calibration.json`, written by tools/calibrate.py; every fit
names its source, GPU and software version there). `model/cost.py` builds an engine
iteration from them.

The functional forms (identical in tools/calibrate.py, which fits them with numpy):

    s(x; x0, a) = 1 / (1 + (x0 / x)^a)                 saturating in (0, 1)
    comb(tc, tm; p) = (tc^p + tm^p)^(1/p)               smooth max (p = 1: sum, p -> inf: max)

    GEMM       t = t0 + comb(F / (P ec s(m) s(n) s(k) s(F) q^w),  B / (W em s(B) s'(n)); p)
               F = 2mnk, B = m k a + n k w + 2 m n  (a, w: activation and weight bytes)
               q = m n / (waves x SMs x 64 x 128): the share of tile slots the output fills,
               in 64 x 128 tiles, waves = ceil(ceil(m/64) ceil(n/128) / SMs) (the last tile of
               a row or column and the last wave run partly empty), m and n at least one tile
               (below it s(m) and s(n) hold the padding); absent from older fits
    prefill    t = t0 + cseq nseq kv^ck + comb(F / (P ec (d/256)^g s(F) s(hQ) s(pairs/Q) s(h/kv)), B / (W em); p)
               F = 2 h (dqk + dv) (pairs + Q tile / 2)   (tile: the causal diagonal's padding)
               B = Q (2 h (dqk + dv) + kv (dqk + dv) kvb),  nseq = max(1, Q^2 / (2 pairs))
               (s(h/kv): efficiency grows with the query heads sharing a KV head; kv^ck: the
               per-sequence cost grows with the KV heads; both absent from older fits)
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
               after an instance idled (`CostModel.wake_time`); `overhead request` is time a
               request spends outside the engine loop, added to its first token and its end
               (`CostModel.request_time`); all are applied by model/cost.py

P is the GPU's dense peak for the compute dtype, W its HBM bandwidth, BW the link's bandwidth
per direction. GPUs without fitted data borrow the curves of the closest calibrated GPU
(`FALLBACK`) as efficiencies relative to their own peaks, and `CostModel.calibrated` is False.

Kernel sets. The GEMM and attention fits are of one engine's kernels: a GPU's top-level fits
are the default set (vLLM's, `DEFAULT_KERNELS`); `gpus[g]["engines"][name]` holds another
engine's fits of some families where its kernel tables were measured (TensorRT-LLM on H100).
`operators(gpu, kernels)` takes family f from `engines[kernels][f]` when it exists, else the
default set's f, and `Operators.kernels` records which set each family came from (also in
`calibration_source`). Collectives, elementwise kernels and transfers are engine-independent.

Importing this module is cheap (no numpy); the calibration file is read on first use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from flowc.compiler import spec
from flowc.compiler.model.engines import ENGINES, engine_profile
from flowc.compiler.model.geometry import ACTIVATION_BYTES
from flowc.compiler.spec import DTYPE_BYTES

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
# Families fitted per engine (kernel set), and the set of the top-level fits.
KERNEL_FAMILIES = ("gemm", "attention_prefill", "attention_decode")
DEFAULT_KERNELS = "vllm"


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


GEMM_TILE = (64, 128)  # the output tile of the wave term (rows, columns): one representative size


def wave_fill(m: float, n: float, sms: float) -> float:
    """The share of the tile slots an m x n output fills over its waves: GEMM_TILE tiles, `sms` at
    a time, the last tile of a row or column and the last wave partly empty. The work done is
    then F / fill: one more row never takes less time. Within one tile (m or n below it) the
    fitted small-shape factors s(m), s(n) already hold the padding: the fill counts whole tiles."""
    m, n = max(m, GEMM_TILE[0]), max(n, GEMM_TILE[1])
    tiles = math.ceil(m / GEMM_TILE[0]) * math.ceil(n / GEMM_TILE[1])
    return m * n / (math.ceil(tiles / sms) * sms * GEMM_TILE[0] * GEMM_TILE[1])


def gemm_curve(c: dict, m: float, n: float, k: float, flops: float, nbytes: float, peak: float, bw: float) -> float:
    """Seconds of one GEMM kernel from its FLOPs and HBM bytes (the fitted form above).
    `m` is the rows per weight matrix (a grouped GEMM passes rows per active expert)."""
    eff_c = c["ec"] * _s(m, c["m0"], c["am"]) * _s(n, c["n0"], c["an"]) * _s(k, c["k0"], c["ak"]) \
        * _s(flops, c["F0"], c["aF"])
    if "w" in c and m > 0 and n > 0:
        eff_c *= wave_fill(m, n, c["sms"]) ** c["w"]
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
    kv = max(kv_heads, 1.0)
    eff = c["ec"] * (d / 256.0) ** c["g"] * _s(flops, c["F0"], c["aF"]) * _s(heads * q, c["h0"], c["ah"]) \
        * _s(pairs / q, c["k0"], c["ak"]) * _s(heads / kv, c.get("r0", 0.0), c.get("ar", 1.0))
    nseq = max(1.0, q * q / (2.0 * pairs))
    return c["cseq"] * nseq * kv ** c.get("ck", 0.0) + _comb(flops / (peak * eff), nbytes / (bw * c["em"]), c["p"])


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
    calibrated GPU's (`FALLBACK`), or generic defaults; `calibrated` says which. `kernels` names
    the kernel set (engine) whose GEMM and attention fits to use where the GPU has them;
    `self.kernels` maps each of KERNEL_FAMILIES to the set actually used. `data`: a calibration
    document to use instead of stdlib/calibration.json (tools/calibrate.py checks fresh fits)."""

    def __init__(self, gpu: spec.GPU, kernels: str = DEFAULT_KERNELS, data: Optional[dict] = None):
        self.gpu = gpu
        self.bw = gpu.memory_bandwidth
        self._cal = calibration() if data is None else data
        self.requested_kernels = kernels
        cal = self._cal.get("gpus", {})
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
        base = cal.get(self.base_name, {}) if self.base_name else {}
        default = base.get("kernels", DEFAULT_KERNELS)
        engine = base.get("engines", {}).get(kernels, {}) if kernels != default else {}
        self.fits = {**base, **{f: engine[f] for f in KERNEL_FAMILIES if engine.get(f)}}
        # which kernel set each family's fits are of (the default set where `kernels` has none)
        self.kernels = {f: (kernels if engine.get(f) else default) for f in KERNEL_FAMILIES}
        self._all = cal
        self.calibration_source = self._describe()

    # -- bookkeeping
    def kernels_text(self) -> str:
        """Which engine's kernels the GEMM and attention fits are of, e.g. "TensorRT-LLM kernels"
        or "vLLM kernels (no trtllm kernel fits for l40s)"."""
        used = dict.fromkeys(self.kernels.values())
        label = {k: engine_profile(k).label if k in ENGINES else k for k in used}
        if len(used) == 1:
            (only,) = used
            text = f"{label[only]} kernels"
            if only != self.requested_kernels:
                text += f" (no {self.requested_kernels} kernel fits for {self.base_name})"
            return text
        return ", ".join(f"{label[k]} kernels for " + " and ".join(f for f in KERNEL_FAMILIES if self.kernels[f] == k)
                         for k in used)

    def _describe(self) -> str:
        if not self.fits:
            return f"{self.gpu.name}: uncalibrated, generic roofline efficiencies (no calibration data)"
        sources = self._cal.get("sources", {})

        def name(source_id: str) -> str:
            s = sources.get(source_id, {})
            return f"{s.get('project', source_id)} {s.get('software', '')}".strip()

        used = dict.fromkeys(name(f["source"]) for fam in KERNEL_FAMILIES for f in self.fits.get(fam, {}).values())
        text = ", ".join(used)
        kernels = self.kernels_text()
        if self.base_name != self.gpu.name:
            return (f"{self.gpu.name}: uncalibrated, efficiency curves borrowed from {self.base_name} ({text}; "
                    f"{kernels}) applied to its own peaks")
        borrowed = self.fits.get("borrowed", {})
        extra = "".join(f"; {fam} from {src}" for fam, src in sorted(borrowed.items()))
        return f"{self.gpu.name}: calibrated on {text}; {kernels}{extra}"

    def _peak(self, dtype: str) -> float:
        flops = self.gpu.flops
        if dtype in flops:
            return flops[dtype]
        for alt in ("bf16", "fp16", "fp32"):
            if alt in flops:
                return flops[alt]
        raise ValueError(f"GPU {self.gpu.name} declares no FLOP/s")

    def fit(self, family: str, key: str, generic: dict) -> dict:
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
        curve = self.fit("gemm", mode.curve, GENERIC_GEMM)
        return gemm_curve(curve, m / max(groups, 1.0), n, k, flops, nbytes, mode.peak, self.bw)

    def gemm_time(self, m: float, n: float, k: float, dtype: str = "bf16") -> float:
        """Seconds of y[m, n] = x[m, k] @ W[k, n] with weights in `dtype` (activations bf16, or
        fp8/fp4 quantized for W8A8 / W4A4). FLOPs 2mnk; bytes m k a + n k w + 2 m n."""
        return self.gemm_mode_time(self.gemm_mode(dtype), m, n, k)

    # -- attention
    def attn_peak(self, kv_dtype: str = "bf16") -> float:
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
        c = self.fit("attention_prefill", kv_dtype, GENERIC_PREFILL)
        body = prefill_body(c, q, pairs, heads, kv_heads, head_dim, v_head_dim or head_dim, DTYPE_BYTES[kv_dtype],
                            self.attn_peak(kv_dtype), self.bw)
        return c["t0"] + body if pairs else 0.0

    def attention_decode_time(self, seqs: int, kv_tokens_total: int, heads: int, kv_heads: int, head_dim: int,
                              kv_dtype: str = "bf16") -> float:
        """Seconds of decode attention: `seqs` sequences, one new token each, reading
        `kv_tokens_total` cached tokens in all (cap each at the sliding window first).
        FLOPs 4 h d K; bytes 2 kv d kvb K (K and V) + 4 h d seqs (q in, o out, bf16)."""
        if seqs <= 0:
            return 0.0
        c = self.fit("attention_decode", kv_dtype, GENERIC_DECODE)
        flops = 4.0 * heads * head_dim * kv_tokens_total
        nbytes = 2.0 * kv_heads * head_dim * DTYPE_BYTES[kv_dtype] * kv_tokens_total + 4.0 * heads * head_dim * seqs
        return c["t0"] + decode_body(c, seqs * kv_heads, flops, nbytes, self.attn_peak(kv_dtype), self.bw)

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
def _operators_cached(gpu_json: str, kernels: str) -> Operators:
    return Operators(spec.GPU.model_validate_json(gpu_json), kernels)


def operators(gpu: spec.GPU, kernels: str = DEFAULT_KERNELS) -> Operators:
    """Operators of a GPU with the GEMM and attention kernels of the set `kernels` where the
    GPU has fits of them (else the default, vLLM's), shared between cost models of the same
    GPU and kernel set."""
    return _operators_cached(gpu.model_dump_json(), kernels)


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
