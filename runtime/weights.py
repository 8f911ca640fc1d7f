"""Weights from a local Hugging Face model directory onto a `CausalLM`, each rank reading only
its shard (safetensors slices), and deterministic random weights for tests and demos.

A directory holds config.json and either model.safetensors or shards listed by
model.safetensors.index.json. Tensor names are transformers': model.embed_tokens,
model.layers.N.{input_layernorm, post_attention_layernorm}, self_attn.{q,k,v,o}_proj (biases
for Qwen2), mlp.{gate,up,down}_proj, model.norm, lm_head (absent when tied). Mixtral experts
come in two layouts: the hub's (block_sparse_moe.gate and block_sparse_moe.experts.E.{w1,w3,w2},
which transformers 5's save_pretrained also writes by default) and transformers 5's fused one
(mlp.gate, mlp.experts.gate_up_proj [E, 2F, H] with gate rows first, mlp.experts.down_proj
[E, H, F]; save_pretrained(save_original_format=False)).

Every failure is a `WeightsError` naming the file or tensor and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .model import CausalLM
from .parallel import Parallel

__all__ = ["WeightsError", "load_config", "load_model", "load_weights", "random_weights"]

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ALL = slice(None)


class WeightsError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor and the fix."""


def load_config(path: str | Path) -> ModelConfig:
    """The config of the model directory `path` (its config.json; stop tokens also from
    generation_config.json)."""
    root = _model_dir(path)
    file = root / CONFIG
    if not file.is_file():
        raise WeightsError(f"{root} has no {CONFIG}: a Hugging Face model directory holds the {CONFIG} "
                           f"written by save_pretrained (download it with the weights)")
    raw = _read_json(file)
    _check_config_values(raw, file)
    try:
        config = ModelConfig.from_hf(raw)
    except KeyError as e:
        raise WeightsError(f"{file} lacks {e.args[0]!r}: re-download or re-save the model's {CONFIG}") from e
    except ValueError as e:
        raise WeightsError(f"{file}: {e}") from e
    except (TypeError, ArithmeticError, AttributeError) as e:  # a value of another JSON type than transformers'
        raise WeightsError(f"{file} holds a value flowc cannot read ({e}): re-download or re-save the model's "
                           f"{CONFIG}") from e
    generation = root / GENERATION_CONFIG
    if not generation.is_file():
        return config
    eos = _read_json(generation).get("eos_token_id")
    extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys([*config.eos_token_ids, *extra])))


def load_model(path: str | Path, ops: SimpleNamespace, parallel: Parallel = Parallel(),
               dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> CausalLM:
    """This rank's part of the model in directory `path`, its weights cast to `dtype`."""
    model = CausalLM(load_config(path), ops, parallel, dtype, device)
    load_weights(model, path)
    return model


def load_weights(model: CausalLM, path: str | Path) -> None:
    """Fill `model`'s parameters with its rank's shard of the checkpoint in `path`, reading only
    that shard of each tensor and casting it to the model's dtype."""
    with _Checkpoint(_model_dir(path)) as checkpoint:
        first = model.layout.layers.start
        fused = model.config.is_moe and f"model.layers.{first}.mlp.experts.gate_up_proj" in checkpoint
        for target in _targets(model, fused):
            target.dest.copy_(checkpoint.read(target).to(target.dest.dtype))


def random_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Fill `model` with random weights that depend only on `seed` and the tensor's name, so
    every TP / PP layout of one seed is the same model: linear weights N(0, std), norm
    weights 1 + N(0, std)."""
    for target in _targets(model, fused_experts=False):
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(target.name.encode()))
        full = torch.randn(target.shape, generator=g) * std
        if "norm" in target.name:
            full += 1
        target.dest.copy_(full[target.index].to(target.dest.dtype))


# ------------------------------------------------------------------------- the name mapping


@dataclass(frozen=True)
class _Target:
    """One checkpoint tensor (or part of it) for one parameter (or part of it)."""

    name: str
    shape: tuple[int, ...]  # the full tensor's shape, from the model config
    index: tuple[slice, ...]  # this rank's part of it
    dest: torch.Tensor  # a view of the parameter it fills


def _rows(r: range, unit: int = 1) -> slice:
    return slice(r.start * unit, r.stop * unit)


def _targets(model: CausalLM, fused_experts: bool) -> list[_Target]:
    """Every checkpoint tensor `model` (this rank's part) reads, and where it goes."""
    c, lay = model.config, model.layout
    H, d = c.hidden, c.head_dim
    vocab = (_rows(lay.vocab),)
    out = []
    if model.embed is not None:
        out.append(_Target("model.embed_tokens.weight", (c.vocab, H), vocab, model.embed[:len(lay.vocab)]))
    if model.lm_head is not None and model.lm_head is not model.embed:
        name = "model.embed_tokens.weight" if c.tied_embeddings else "lm_head.weight"
        out.append(_Target(name, (c.vocab, H), vocab, model.lm_head[:len(lay.vocab)]))
    if model.norm is not None:
        out.append(_Target("model.norm.weight", (H,), (_ALL,), model.norm))
    for layer, n in zip(model.layers, lay.layers):
        p = f"model.layers.{n}."
        out.append(_Target(p + "input_layernorm.weight", (H,), (_ALL,), layer.input_norm))
        out.append(_Target(p + "post_attention_layernorm.weight", (H,), (_ALL,), layer.post_attention_norm))
        attn, start = layer.attn, 0
        for proj, heads, total in (("q", lay.heads, c.heads), ("k", lay.kv_heads, c.kv_heads),
                                   ("v", lay.kv_heads, c.kv_heads)):
            rows, size = (_rows(heads, d),), len(heads) * d
            out.append(_Target(f"{p}self_attn.{proj}_proj.weight", (total * d, H), rows, attn.qkv[start:start + size]))
            if attn.qkv_bias is not None:
                out.append(_Target(f"{p}self_attn.{proj}_proj.bias", (total * d,), rows,
                                   attn.qkv_bias[start:start + size]))
            start += size
        out.append(_Target(p + "self_attn.o_proj.weight", (H, c.heads * d), (_ALL, _rows(lay.heads, d)), attn.o))
        if not c.is_moe:
            out += _mlp_targets(p + "mlp.", layer.mlp, c.ffn, lay.ffn, H)
        elif fused_experts:
            out += _fused_expert_targets(p + "mlp.", layer.mlp, c, lay.ffn, lay.experts)
        else:
            moe = layer.mlp
            out.append(_Target(p + "block_sparse_moe.gate.weight", (c.experts, H), (_ALL,), moe.router))
            for i, e in enumerate(lay.experts):  # this rank's experts (all of them at ep 1)
                expert = SimpleNamespace(gate_up=moe.gate_up[i], down=moe.down[i])
                out += _mlp_targets(f"{p}block_sparse_moe.experts.{e}.", expert, c.expert_ffn, lay.ffn, H,
                                    names=("w1", "w3", "w2"))
    return out


def _mlp_targets(p: str, mlp: Any, ffn: int, cols: range, hidden: int,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[_Target]:
    """A gated MLP's gate, up and down projections: rows `cols` of gate and up into gate_up
    (gate first), the same columns of down."""
    f = len(cols)
    gate, up, down = names
    return [_Target(f"{p}{gate}.weight", (ffn, hidden), (_rows(cols),), mlp.gate_up[:f]),
            _Target(f"{p}{up}.weight", (ffn, hidden), (_rows(cols),), mlp.gate_up[f:]),
            _Target(f"{p}{down}.weight", (hidden, ffn), (_ALL, _rows(cols)), mlp.down)]


def _fused_expert_targets(p: str, moe: Any, c: ModelConfig, cols: range, experts: range) -> list[_Target]:
    E, H, F, f, held = c.experts, c.hidden, c.expert_ffn, len(cols), _rows(experts)
    gate_up = f"{p}experts.gate_up_proj"
    return [_Target(f"{p}gate.weight", (E, H), (_ALL,), moe.router),
            _Target(gate_up, (E, 2 * F, H), (held, _rows(cols)), moe.gate_up[:, :f]),
            _Target(gate_up, (E, 2 * F, H), (held, slice(F + cols.start, F + cols.stop)), moe.gate_up[:, f:]),
            _Target(f"{p}experts.down_proj", (E, H, F), (held, _ALL, _rows(cols)), moe.down)]


# ------------------------------------------------------------------------- the checkpoint


def _model_dir(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise WeightsError(f"model directory {root} {what}: pass a local Hugging Face model directory "
                           f"({CONFIG} and {SINGLE_FILE} or sharded safetensors with {INDEX_FILE})")
    return root


# config.json fields read as sizes and counts, with their least value (null: the default), and
# as positive reals.
CONFIG_COUNTS = {"num_hidden_layers": 1, "hidden_size": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                 "head_dim": 1, "intermediate_size": 1, "vocab_size": 1, "max_position_embeddings": 1,
                 "num_local_experts": 1, "num_experts_per_tok": 1, "sliding_window": 1, "max_window_layers": 0}
CONFIG_REALS = ("rms_norm_eps", "rope_theta")


def _check_config_values(raw: dict[str, Any], file: Path) -> None:
    """WeightsError naming the first size, count or real of config.json that is not one."""
    for key, least in CONFIG_COUNTS.items():
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise WeightsError(f"{file}: {key} is {value!r}, not a whole number of at least {least}: re-download "
                               f"or re-save the model's {CONFIG}")
    for key in CONFIG_REALS:
        value = raw.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not 0 < value < float("inf")):
            raise WeightsError(f"{file}: {key} is {value!r}, not a positive number: re-download or re-save the "
                               f"model's {CONFIG}")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{file} is not readable JSON ({e}): re-download or re-save it") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{file} holds {type(data).__name__}, not a JSON object: re-download or re-save it")
    return data


def _trees(root: Path) -> tuple[Path, ...]:
    """Where the files a checkpoint's index names may lie: its directory and, for a snapshot in
    the Hugging Face cache (`models--ORG--NAME/snapshots/REV/`, whose files are links to
    `../../blobs/`), that model's blobs."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real, real.parent.parent / "blobs"
    return (real,)


def _shard(root: Path, trees: tuple[Path, ...], index: Path, tensor: str, file: Any) -> Path:
    """The file `index` maps `tensor` to, its symbolic links resolved; WeightsError when that is
    no file name or lies outside `trees` (`../`, an absolute path, a link out): a downloaded
    checkpoint must not read files elsewhere on the machine. Index values are quoted with repr,
    which escapes control characters."""
    if not isinstance(file, str) or not file or "\0" in file:
        raise WeightsError(f"{index} maps {tensor!r} to {file!r}, which is not a file name: re-download or "
                           f"re-save the model")
    try:
        path = (root / file).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a loop of symbolic links
        raise WeightsError(f"{index} maps {tensor!r} to {file!r}, which cannot be resolved ({e}): re-download "
                           f"or re-save the model") from e
    if not any(path.is_relative_to(tree) for tree in trees):
        raise WeightsError(f"{index} maps {tensor!r} to {file!r}, which lies outside {root}: a checkpoint's "
                           f"shards are files in its directory; re-download or re-save the model")
    return path


class _Checkpoint(contextlib.ExitStack):
    """The safetensors tensors of a model directory by name; files are opened once, on first
    use, and closed on exit."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        index, single = root / INDEX_FILE, root / SINGLE_FILE
        self.handles: dict[Path, Any] = {}
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index} has no \"weight_map\" object: re-download or re-save the model")
            self.source = f"the shards {index.name} lists"
            trees = _trees(root)
            self.files = {name: _shard(root, trees, index, name, file) for name, file in weight_map.items()}
            return
        if not single.is_file():
            bins = sorted(p.name for p in root.glob("*.bin"))
            hint = (f"; it has PyTorch weights ({', '.join(bins[:3])}): convert them to safetensors, e.g. "
                    f"load the model with transformers and save_pretrained it") if bins else ""
            raise WeightsError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self.source = single.name
        self.files = dict.fromkeys(self._open(single).keys(), single)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _open(self, file: Path) -> Any:
        if file not in self.handles:
            try:
                self.handles[file] = self.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except (OSError, SafetensorError) as e:
                raise WeightsError(f"{file} is not a readable safetensors file ({e}): re-download it") from e
        return self.handles[file]

    def read(self, target: _Target) -> torch.Tensor:
        """This rank's part of `target`'s tensor, after checking its shape and dtype."""
        file = self.files.get(target.name)
        if file is None:
            raise WeightsError(f"tensor {target.name} is not in {self.root} ({self.source}): the checkpoint does "
                               f"not hold the model {CONFIG} describes; re-save it with save_pretrained")
        if not file.is_file():
            raise WeightsError(f"{INDEX_FILE} maps {target.name} to {file.name}, which is missing from "
                               f"{self.root}: download every shard the index lists")
        part = self._open(file).get_slice(target.name)
        shape, dtype = tuple(part.get_shape()), part.get_dtype()
        if shape != target.shape:
            raise WeightsError(f"tensor {target.name} in {file.name} has shape {list(shape)}, but the model's "
                               f"config implies {list(target.shape)}: the weights are not the model {CONFIG} "
                               f"(or the plan) describes")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"tensor {target.name} in {file.name} is {dtype}: only unquantized checkpoints "
                               f"({', '.join(FLOAT_DTYPES)}) load; use the model's bf16 or fp16 release")
        return part[target.index]
