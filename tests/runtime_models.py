"""Tiny random-weight Hugging Face models for runtime tests, and the bookkeeping to run them
through the paged cache.

`save_tiny_model(variant, dir)` builds one of `VARIANTS` with transformers (fp32, eager
attention, fixed seed, weights widened so attention and routing are far from uniform, which
lets a wrong rotary, mask or routing show in the logits) and save_pretrained's it.
`PagedBatch` hands out KV blocks in a shuffled order and builds `StepInputs`.
`run_steps` loads a directory and runs steps; it is module-level so that `launch` can run it
on every TP rank. transformers is imported only where a model is built or run, so that those
ranks import torch and flowc alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Sequence

import torch

from flowc.compiler.spec import Model, MoE
from flowc.runtime.kernels import get_ops
from flowc.runtime.model import StepInputs
from flowc.runtime.parallel import Parallel
from flowc.runtime.weights import load_model
from flowc.runtime.workspace import HeapWorkspace

# 2 layers, hidden 64, 4 heads of 16, 2 KV heads (GQA), ffn 96, vocab 128, 256 positions.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# variant: (transformers class, config overrides)
VARIANTS = {
    # llama3 RoPE scaling: with head_dim 16 and original context 64, its three bands are all used
    "llama": ("LlamaForCausalLM", dict(head_dim=16, rope_parameters=LLAMA3_ROPE)),
    # one KV head (so tp 2 replicates it) and linear RoPE scaling
    "llama_mqa": ("LlamaForCausalLM", dict(num_key_value_heads=1,
                                           rope_parameters={"rope_type": "linear", "rope_theta": 500000.0,
                                                            "factor": 2.0})),
    # QKV biases, tied embeddings, a vocabulary that does not split evenly over 2 ranks
    "qwen2": ("Qwen2ForCausalLM", dict(vocab_size=131, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", dict(head_dim=16, sliding_window=8)),
    "mixtral": ("MixtralForCausalLM", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
}
WEIGHT_STD = 0.15


def build_hf_model(variant: str, seed: int = 0):
    """The transformers model of `variant`, fp32, eager attention, random weights from `seed`:
    N(0, WEIGHT_STD) matrices and biases, 1 + N(0, 0.1) norm weights."""
    import transformers

    class_name, overrides = VARIANTS[variant]
    cls = getattr(transformers, class_name)
    config = cls.config_class(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else WEIGHT_STD * noise)
    return model


def save_tiny_model(variant: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    """Build `variant` and save_pretrained it to `path` (kwargs: e.g. max_shard_size)."""
    build_hf_model(variant, seed).save_pretrained(path, **save_kwargs)
    return path


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' own load of a saved directory (eager attention): the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def hf_logits(model, token_ids: Sequence[int]) -> torch.Tensor:
    """transformers' logits [len, vocab] at every position of one sequence."""
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float()


def sample_prompts(vocab: int, seed: int = 0, n: int = 8) -> list[list[int]]:
    """Up to 8 random prompts of mixed lengths (1 to 70 tokens)."""
    import random

    rng = random.Random(seed)
    lengths = [3, 45, 9, 70, 17, 1, 33, 26][:n]
    return [[rng.randrange(vocab) for _ in range(length)] for length in lengths]


def hf_greedy(path: Path, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> list[list[int]]:
    """transformers' greedy `generate` of each prompt alone (no padding): the reference tokens."""
    model = load_hf_model(path)
    outputs = []
    for prompt, n in zip(prompts, max_tokens):
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def tiny_spec(variant: str) -> Model:
    """The spec `Model` of `variant`, written from the HF sizes (for plans and workspaces)."""
    class_name, overrides = VARIANTS[variant]
    c = {**TINY, **overrides}
    moe = None
    if "num_local_experts" in c:
        moe = MoE(experts=c["num_local_experts"], top_k=c["num_experts_per_tok"], expert_ffn=c["intermediate_size"])
    arch = {"Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}.get(class_name, "llama")
    return Model(name=f"tiny-{variant}", architecture=arch, layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                 heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"],
                 head_dim=c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]), ffn=c["intermediate_size"],
                 vocab=c["vocab_size"], max_context=c["max_position_embeddings"], weights="fp32", kv="fp32",
                 tied_embeddings=c.get("tie_word_embeddings", False), attention_bias=arch == "qwen2",
                 sliding_window=c.get("sliding_window"), moe=moe)


class PagedBatch:
    """The paged-cache bookkeeping of a scheduler, for tests: sequences grow by the tokens
    given to `step`, taking blocks from a shuffled free list as they cross block boundaries."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.block_size = block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: dict[Hashable, list[int]] = {}
        self.lens: dict[Hashable, int] = {}

    def step(self, new_tokens: dict[Hashable, Sequence[int]], all_logits: bool = False) -> StepInputs:
        """Inputs for one step adding `new_tokens` to each sequence (in the dict's order); the
        logits rows are every token's with `all_logits`, else each sequence's last."""
        bs = self.block_size
        ids, positions, slots, starts, lens, rows = [], [], [], [0], [], []
        for seq, tokens in new_tokens.items():
            blocks = self.blocks.setdefault(seq, [])
            first = self.lens.get(seq, 0)
            for pos in range(first, first + len(tokens)):
                if pos // bs == len(blocks):
                    blocks.append(self.free.pop())
                positions.append(pos)
                slots.append(blocks[pos // bs] * bs + pos % bs)
            ids += list(tokens)
            self.lens[seq] = first + len(tokens)
            lens.append(self.lens[seq])
            rows += list(range(starts[-1], starts[-1] + len(tokens))) if all_logits else [starts[-1] + len(tokens) - 1]
            starts.append(starts[-1] + len(tokens))
        width = max(len(self.blocks[seq]) for seq in new_tokens)
        tables = torch.zeros((len(new_tokens), width), dtype=torch.int32)
        for i, seq in enumerate(new_tokens):
            tables[i, :len(self.blocks[seq])] = torch.tensor(self.blocks[seq], dtype=torch.int32)
        return StepInputs(input_ids=torch.tensor(ids), positions=torch.tensor(positions),
                          slot_mapping=torch.tensor(slots), block_tables=tables,
                          seq_lens=torch.tensor(lens, dtype=torch.int32),
                          query_start_loc=torch.tensor(starts, dtype=torch.int32),
                          logits_indices=torch.tensor(rows))


def run_steps(parallel: Parallel, path: Path, steps: Sequence[dict[Hashable, Sequence[int]]],
              num_blocks: int = 64, block_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Load `path` (fp32, torch kernels) as this rank's shard and run `steps` (every row's
    logits): per step, (the gathered logits, this rank's logits shard)."""
    model = load_model(path, get_ops("torch"), parallel, torch.float32)
    kv = model.make_kv_cache(num_blocks, block_size)
    batch, workspace = PagedBatch(num_blocks, block_size), HeapWorkspace()
    out = []
    for tokens in steps:
        inputs = batch.step(tokens, all_logits=True)
        full = model(inputs, kv, workspace).clone()
        # The same step again (cache writes are idempotent), returning the shard this time.
        shard = model(inputs, kv, workspace, gather_logits=False).clone()
        out.append((full, shard))
    return out
