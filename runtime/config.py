"""The model configuration the runtime builds a model from: the planning fields of a spec
`Model` plus what the math needs (RoPE, norm epsilon, MoE routing, stop tokens).

Two sources: a plan's `model_spec` (`ModelConfig.from_spec`, for random-weight runs) and a
Hugging Face `config.json` (`ModelConfig.from_hf`). `mismatches` compares the two so the
engine can refuse weights that are not the model the plan was made for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from flowc.compiler.spec import Model

__all__ = ["ModelConfig", "UnsupportedModel", "SUPPORTED_ARCHITECTURES", "HF_ARCHITECTURES"]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mixtral")
# Hugging Face model classes the runtime runs, and the architecture each one is run as.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # Llama with a sliding window
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}
# (rope_theta, rms_norm_eps) that transformers' config classes assume when config.json omits
# them; from_spec uses them too, since a spec does not carry either.
_HF_DEFAULTS = {
    "LlamaForCausalLM": (10000.0, 1e-6),
    "MistralForCausalLM": (10000.0, 1e-6),
    "Qwen2ForCausalLM": (10000.0, 1e-6),
    "MixtralForCausalLM": (1e6, 1e-5),
}
_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    """A model the runtime cannot run (architecture or feature)."""

    def __init__(self, what: str):
        supported = ", ".join(f"{arch} ({cls})" for arch, cls in _ARCH_CLASS.items())
        super().__init__(f"{what}: the runtime runs {supported}, and Mistral as llama")


@dataclass(frozen=True)
class ModelConfig:
    """Full-model sizes (not per rank). `ffn` is the dense MLP width; MoE models (experts > 0)
    route each token to `top_k` of `experts` gated MLPs of width `expert_ffn`.
    `rope_scaling`: None, or HF's dict with "rope_type" "linear" (factor) or "llama3" (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings)."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_context: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = field(default=None, hash=False)
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tied_embeddings: bool = False
    sliding_window: Optional[int] = None
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    renormalize_topk: bool = True
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(f"architecture {self.architecture!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary pairs the two halves)")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if (self.architecture == "mixtral") != self.is_moe:
            raise ValueError("mixtral, and only mixtral, has experts (experts > 0, 0 < top_k <= experts)")
        if self.is_moe and not 0 < self.top_k <= self.experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..experts ({self.experts})")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES[1:]:
            raise UnsupportedModel(f"rope_scaling {self.rope_scaling}")

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    # ------------------------------------------------------------------------------ RoPE

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [head_dim / 2] fp32, computed as transformers does (same fp32
        operations in the same order, so the cos/sin tables agree bit for bit)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        scaling = self.rope_scaling
        if scaling is None:
            return inv
        factor = scaling["factor"]
        if scaling["rope_type"] == "linear":
            return inv / factor
        # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
        # the two interpolated smoothly.
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled)

    def cos_sin_cache(self, max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """fp32 [max_positions, head_dim]: cos of position x inv_freq in the first half, sin in
        the second (the table `ops.rotary` takes)."""
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * self.inv_freq()[None, :]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_spec(cls, model: Model) -> "ModelConfig":
        """The config of a spec `Model` (a plan's model_spec). A spec carries neither RoPE nor
        the norm epsilon: they take transformers' defaults for the architecture."""
        arch = model.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(f"model {model.name!r} has architecture {arch!r}")
        if model.mla is not None or model.mlp != "gated":
            raise UnsupportedModel(f"model {model.name!r} (MLA attention or a plain MLP)")
        moe = model.moe
        if moe is not None and (moe.shared_experts or moe.dense_layers):
            raise UnsupportedModel(f"model {model.name!r} (shared experts or dense layers in an MoE model)")
        theta, eps = _HF_DEFAULTS[_ARCH_CLASS[arch]]
        return cls(architecture=arch, layers=model.layers, hidden=model.hidden, heads=model.heads,
                   kv_heads=model.kv_heads, head_dim=model.head_dim, ffn=model.ffn, vocab=model.vocab,
                   max_context=model.max_context, rope_theta=theta, rms_norm_eps=eps,
                   attention_bias=model.attention_bias, tied_embeddings=model.tied_embeddings,
                   sliding_window=model.sliding_window,
                   experts=moe.experts if moe else 0, top_k=moe.top_k if moe else 0,
                   expert_ffn=moe.expert_ffn if moe else 0)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """The config of a Hugging Face config.json (transformers 4 or 5 layout)."""
        names = config.get("architectures") or []
        hf_class = next((n for n in names if n in HF_ARCHITECTURES), None)
        if hf_class is None:
            raise UnsupportedModel(f"architectures {names or '(none)'}")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"{hf_class} with hidden_act {config['hidden_act']!r} (the MLP is SiLU-gated)")
        if config.get("mlp_bias"):
            raise UnsupportedModel(f"{hf_class} with mlp_bias")
        arch = HF_ARCHITECTURES[hf_class]
        if arch == "llama" and config.get("attention_bias"):
            raise UnsupportedModel(f"{hf_class} with attention_bias (biases on q, k, v and o_proj)")
        default_theta, default_eps = _HF_DEFAULTS[hf_class]
        heads = config["num_attention_heads"]
        theta, scaling = _rope(config, default_theta)
        eos = config.get("eos_token_id")
        return cls(
            architecture=arch,
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            ffn=config["intermediate_size"],
            vocab=config["vocab_size"],
            max_context=config["max_position_embeddings"],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=config.get("rms_norm_eps", default_eps),
            attention_bias=arch == "qwen2",  # Qwen2's q, k, v projections always carry biases
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(config, hf_class),
            experts=config["num_local_experts"] if arch == "mixtral" else 0,
            top_k=config.get("num_experts_per_tok", 2) if arch == "mixtral" else 0,
            expert_ffn=config["intermediate_size"] if arch == "mixtral" else 0,
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    def mismatches(self, model: Model) -> list[str]:
        """Planning fields where `model` (the plan's) differs from this config (the weights'),
        as "field: plan X, weights Y"; empty when the weights fit the plan."""
        moe = model.moe
        planned = {
            "architecture": model.architecture, "layers": model.layers, "hidden": model.hidden,
            "heads": model.heads, "kv_heads": model.kv_heads, "head_dim": model.head_dim, "ffn": model.ffn,
            "vocab": model.vocab, "attention_bias": model.attention_bias,
            "tied_embeddings": model.tied_embeddings, "sliding_window": model.sliding_window,
            "experts": moe.experts if moe else 0, "top_k": moe.top_k if moe else 0,
            "expert_ffn": moe.expert_ffn if moe else 0,
        }
        out = [f"{name}: plan {value}, weights {getattr(self, name)}"
               for name, value in planned.items() if value != getattr(self, name)]
        if model.max_context > self.max_context:
            out.append(f"max_context: plan {model.max_context}, weights support {self.max_context}")
        return out


def _rope(config: dict[str, Any], default_theta: float) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or 4's `rope_theta` +
    `rope_scaling`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModel(f"RoPE parameters per layer type ({', '.join(params)})")
    theta = float(params.pop("rope_theta", None) or config.get("rope_theta") or default_theta)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(f"RoPE type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, "factor": float(params["factor"])}
    if kind == "llama3":
        scaling.update(low_freq_factor=float(params["low_freq_factor"]),
                       high_freq_factor=float(params["high_freq_factor"]),
                       original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                                            or config["max_position_embeddings"]))
    return theta, scaling


def _sliding_window(config: dict[str, Any], hf_class: str) -> Optional[int]:
    """The attention window, when every layer has one. Qwen2 windows only the layers from
    max_window_layers on, and only with use_sliding_window; a mix is not supported."""
    if hf_class == "LlamaForCausalLM":
        return None
    if hf_class == "MistralForCausalLM":
        return config.get("sliding_window", 4096)  # MistralConfig's default when absent
    if hf_class == "MixtralForCausalLM":
        return config.get("sliding_window")
    if not config.get("use_sliding_window") or config.get("sliding_window") is None:
        return None
    layers = config["num_hidden_layers"]
    kinds = config.get("layer_types") or ["sliding_attention" if i >= config.get("max_window_layers", 28)
                                          else "full_attention" for i in range(layers)]
    if all(k == "full_attention" for k in kinds):
        return None
    if all(k == "sliding_attention" for k in kinds):
        return config["sliding_window"]
    raise UnsupportedModel("Qwen2 with sliding-window attention on some layers only (max_window_layers)")
