"""Loading Hugging Face directories (runtime/weights.py): layouts (one file, shards, the two
Mixtral expert layouts), each rank's shard, dtype casts, and a WeightsError naming the file or
tensor and the fix for every broken directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from runtime_models import save_tiny_model
from safetensors.torch import load_file, save_file

from flowc.runtime.kernels import get_ops
from flowc.runtime.model import CausalLM
from flowc.runtime.parallel import Parallel
from flowc.runtime.weights import WeightsError, load_config, load_model, load_weights

OPS = get_ops("torch")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory: llama in one file and in shards, qwen2, llama_mqa, mixtral in the hub's
    expert layout (save_pretrained's default) and in transformers 5's fused one."""
    def save(name, variant, **kwargs):
        return save_tiny_model(variant, tmp_path_factory.mktemp(name), **kwargs)

    return {
        "llama": save("llama", "llama"),
        "llama_sharded": save("llama_sharded", "llama", max_shard_size="100KB"),
        "llama_mqa": save("llama_mqa", "llama_mqa"),
        "qwen2": save("qwen2", "qwen2"),
        "mixtral": save("mixtral", "mixtral"),
        "mixtral_fused": save("mixtral_fused", "mixtral", save_original_format=False),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _params(model: CausalLM) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_sharded_checkpoint_loads_like_one_file(saved):
    sharded = saved["llama_sharded"]
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    one = _params(load_model(saved["llama"], OPS, dtype=torch.float32))
    many = _params(load_model(sharded, OPS, dtype=torch.float32))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_both_mixtral_expert_layouts_load_alike(saved):
    hub, fused = _tensors(saved["mixtral"]), _tensors(saved["mixtral_fused"])
    # transformers 5.23's save_pretrained writes the hub layout unless save_original_format=False
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in hub
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 96, 64)
    a = _params(load_model(saved["mixtral"], OPS, dtype=torch.float32))
    b = _params(load_model(saved["mixtral_fused"], OPS, dtype=torch.float32))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["llama_mqa", "qwen2", "mixtral"])
def test_each_rank_loads_its_shard(saved, variant):
    """Rank r of tp 2 holds its slices of the checkpoint's tensors (no process group is needed
    to build and load one)."""
    path = saved[variant]
    t, config = _tensors(path), load_config(path)
    d, p = config.head_dim, "model.layers.1."
    for rank in range(2):
        model = CausalLM(config, OPS, Parallel(tp_rank=rank, tp_size=2), torch.float32)
        load_weights(model, path)
        layer = model.layers[1]
        q = slice(rank * 2 * d, (rank + 1) * 2 * d)  # 4 heads: two per rank
        kv = slice(0, d) if config.kv_heads == 1 else slice(rank * d, (rank + 1) * d)  # one KV head each
        want_qkv = torch.cat([t[p + "self_attn.q_proj.weight"][q], t[p + "self_attn.k_proj.weight"][kv],
                              t[p + "self_attn.v_proj.weight"][kv]])
        assert torch.equal(layer.attn.qkv, want_qkv)
        assert torch.equal(layer.attn.o, t[p + "self_attn.o_proj.weight"][:, q])
        if config.attention_bias:
            assert torch.equal(layer.attn.qkv_bias, torch.cat([t[p + "self_attn.q_proj.bias"][q],
                                                               t[p + "self_attn.k_proj.bias"][kv],
                                                               t[p + "self_attn.v_proj.bias"][kv]]))
        f = slice(rank * 48, (rank + 1) * 48)  # ffn 96: 48 per rank
        if config.is_moe:
            e = p + "block_sparse_moe.experts.2."
            assert torch.equal(layer.mlp.router, t[p + "block_sparse_moe.gate.weight"])
            assert torch.equal(layer.mlp.gate_up[2], torch.cat([t[e + "w1.weight"][f], t[e + "w3.weight"][f]]))
            assert torch.equal(layer.mlp.down[2], t[e + "w2.weight"][:, f])
        else:
            assert torch.equal(layer.mlp.gate_up, torch.cat([t[p + "mlp.gate_proj.weight"][f],
                                                             t[p + "mlp.up_proj.weight"][f]]))
            assert torch.equal(layer.mlp.down, t[p + "mlp.down_proj.weight"][:, f])
        embed = t["model.embed_tokens.weight"]
        rows = -(-config.vocab // 2)  # qwen2's 131 rows: 66 and 65, the second rank padded with zeros
        mine = embed[rank * rows:(rank + 1) * rows]
        assert torch.equal(model.embed[:len(mine)], mine) and not model.embed[len(mine):].any()
        lm_head = embed if config.tied_embeddings else t["lm_head.weight"]
        assert torch.equal(model.lm_head[:len(mine)], lm_head[rank * rows:(rank + 1) * rows])


def test_weights_are_cast_to_the_model_dtype(saved):
    model = load_model(saved["qwen2"], OPS, dtype=torch.bfloat16)
    t = _tensors(saved["qwen2"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.layers[0].attn.qkv_bias[:64], t["model.layers.0.self_attn.q_proj.bias"].bfloat16())


# ------------------------------------------------------------------------------- errors


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _break(case: str, saved, tmp_path: Path) -> Path:
    """A copy of a saved model broken one way."""
    if case == "missing directory":
        return tmp_path / "nowhere"
    if case == "a file, not a directory":
        return saved["llama"] / "config.json"
    path = _copy(saved["llama_sharded" if case == "missing shard" else "llama"], tmp_path)
    if case == "missing config.json":
        (path / "config.json").unlink()
    elif case == "config.json not JSON":
        (path / "config.json").write_text("{not json")
    elif case == "config.json lacks a key":
        _edit_config(path, hidden_size=None)
    elif case == "unsupported architecture":
        _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    elif case == "no safetensors":
        (path / "model.safetensors").unlink()
        (path / "pytorch_model.bin").write_bytes(b"")
    elif case == "missing tensor":
        _rewrite(path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    elif case == "shape mismatch":
        _edit_config(path, intermediate_size=128)
    elif case == "quantized tensor":
        _rewrite(path, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int8)}))
    elif case == "corrupt safetensors":
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
    elif case == "missing shard":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        (path / index["weight_map"]["model.norm.weight"]).unlink()
    return path


# case -> words the message must hold (the file or tensor, and the fix)
ERRORS = {
    "missing directory": ["nowhere", "does not exist", "config.json"],
    "a file, not a directory": ["is not a directory"],
    "missing config.json": ["has no config.json", "save_pretrained"],
    "config.json not JSON": ["config.json is not readable JSON", "re-download"],
    "config.json lacks a key": ["config.json lacks 'hidden_size'"],
    "unsupported architecture": ["config.json", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"],
    "no safetensors": ["neither model.safetensors nor model.safetensors.index.json", "pytorch_model.bin",
                       "convert"],
    "missing tensor": ["model.layers.1.mlp.down_proj.weight", "is not in", "model.safetensors"],
    "shape mismatch": ["model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]", "config.json"],
    "quantized tensor": ["model.norm.weight", "I8", "unquantized"],
    "corrupt safetensors": ["model.safetensors is not a readable safetensors file"],
    "missing shard": ["model.norm.weight", "missing", "download every shard"],
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_broken_directories_raise_weights_error(saved, tmp_path, case):
    path = _break(case, saved, tmp_path)
    with pytest.raises(WeightsError) as e:
        load_model(path, OPS, dtype=torch.float32)
    message = str(e.value)
    missing = [w for w in ERRORS[case] if w not in message]
    assert not missing, f"{message!r} lacks {missing}"
