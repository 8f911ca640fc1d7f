"""Published total parameter counts of the stdlib models (stdlib/models.flow).

Each entry is ``name: (count, source)``. Exact counts are the totals of the published
checkpoints' tensors (Hugging Face safetensors metadata); they were cross-checked by
instantiating each architecture on the meta device with Hugging Face transformers from the
config.json values in stdlib/models.flow and summing parameter sizes, which reproduced every
exact count below. Entries whose source says "rounded" are only as precise as the figure the
publisher gives, so compare them with a relative tolerance of at least 0.1%.

Two caveats for a test:
- gpt-j-6b: the model card's n_parameters (6,053,381,344) is 2,498,560 (0.04%) more than the
  Hugging Face GPTJForCausalLM built from its config.json (6,050,882,784, counting the MLP and
  lm_head biases and the 28 + 1 LayerNorms). The card's number comes from the original JAX
  code; the difference is not explained there.
- deepseek-v3: 671B is the main model only (61 layers), without the 14B multi-token-prediction
  module that the Hugging Face checkpoint also ships (685B in all). Built from config.json it is
  671,026,404,352 parameters plus 14,848 router score-correction biases
  (e_score_correction_bias, 58 MoE layers x 256 experts) = 671,026,419,200.

tiny-llama is a test model with no published checkpoint; its count is in DERIVED_PARAMS.
"""

PUBLISHED_PARAMS: dict[str, tuple[int, str]] = {
    "llama-2-7b": (6_738_415_616, "meta-llama/Llama-2-7b-hf safetensors total (model card: 7B)"),
    "llama-2-13b": (13_015_864_320, "meta-llama/Llama-2-13b-hf safetensors total (model card: 13B)"),
    "llama-2-70b": (68_976_648_192, "meta-llama/Llama-2-70b-hf safetensors total (model card: 70B)"),
    "llama-3.1-8b": (8_030_261_248, "meta-llama/Llama-3.1-8B safetensors total (model card: 8B)"),
    "llama-3.1-70b": (70_553_706_496, "meta-llama/Llama-3.1-70B safetensors total (model card: 70B)"),
    "llama-3.1-405b": (405_853_388_800, "meta-llama/Llama-3.1-405B safetensors total (model card: 405B)"),
    "gpt-j-6b": (
        6_053_381_344,
        "EleutherAI/gpt-j-6b model card, n_parameters; the HF GPTJForCausalLM from config.json "
        "has 6,050,882,784 (0.04% fewer), see the module docstring",
    ),
    "mixtral-8x7b": (46_702_792_704, "mistralai/Mixtral-8x7B-v0.1 safetensors total (model card: 46.7B)"),
    "mixtral-8x22b": (
        140_620_634_112,
        "mistralai/Mixtral-8x22B-v0.1: sum of the tensor shapes given by its config.json "
        "(vocab 32000); the model card rounds it to 141B",
    ),
    "qwen2.5-7b": (7_615_616_512, "Qwen/Qwen2.5-7B safetensors total (model card: 7.61B)"),
    "qwen2.5-72b": (72_706_203_648, "Qwen/Qwen2.5-72B safetensors total (model card: 72.7B)"),
    "qwen3-30b-a3b": (30_532_122_624, "Qwen/Qwen3-30B-A3B safetensors total (model card: 30.5B)"),
    "deepseek-v3": (
        671_000_000_000,
        "rounded: DeepSeek-V3 technical report and deepseek-ai/DeepSeek-V3 model card, 671B "
        "total excluding the 14B MTP module; exact from config.json: 671,026,419,200",
    ),
}

DERIVED_PARAMS: dict[str, tuple[int, str]] = {
    "tiny-llama": (
        106_816,
        "hand count: embedding 256*64 + 2 layers * (attention 64*64*2 + 64*32*2, MLP 3*64*128, "
        "2 norms of 64) + final norm 64 + lm_head 256*64",
    ),
}
