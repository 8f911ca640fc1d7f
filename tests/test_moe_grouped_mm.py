"""The grouped expert GEMM (`moe_grouped_mm`) and the MoE layer built on it.

The Triton kernel and the torch reference against a dense computation in fp64, on ragged expert
groups (empty experts, an EP rank's slice of the experts, sizes that are no multiple of a tile);
the MoE layer with the Triton kernels makes no host sync and gives the torch backend's output.
Without a GPU, Triton runs under its interpreter (tests/conftest.py): every shape is tiny.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from runtime_models import PagedBatch, tiny_spec  # noqa: E402  (after the importorskip of torch and triton)

from flowc.runtime import kernels_torch as ref  # noqa: E402
from flowc.runtime import kernels_triton as tri  # noqa: E402
from flowc.runtime.config import ModelConfig  # noqa: E402
from flowc.runtime.kernels import get_ops  # noqa: E402
from flowc.runtime.model import CausalLM, MoE, StepInputs, _Step  # noqa: E402
from flowc.runtime.parallel import Parallel  # noqa: E402
from flowc.runtime.workspace import HeapWorkspace  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
MODEL_TOL = dict(atol=1e-4, rtol=1e-4)

# name: (rows of each expert, first held expert, experts held, K, N)
CASES = {
    "uneven": ([3, 17, 1, 9], 0, 4, 40, 24),  # 17 rows: two 16-row tiles
    "empty experts": ([0, 6, 0, 0, 21, 2, 0], 0, 7, 24, 40),
    "ep slice": ([4, 9, 0, 12, 7, 5], 2, 3, 40, 24),  # experts 2..4, the first of them empty
    # 160 rows, over 16 per expert: 64-row tiles; two K steps and two N tiles, both ragged
    "wide tiles": ([40, 70, 0, 50], 1, 2, 72, 80),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _dense(x, weight, counts, first):
    """x @ weight[expert].T row by row in fp64, and which rows are of a held expert."""
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(x.device)
    held = (experts >= first) & (experts < first + weight.shape[0])
    w = weight.double()[(experts - first).clamp(0, weight.shape[0] - 1)]  # [R, N, K]
    return torch.einsum("rk,rnk->rn", x.double(), w), held


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm_matches_a_dense_product(dtype, case):
    counts, first, held, k, n = CASES[case]
    rows = sum(counts)
    offsets = torch.tensor([0] + counts, device=DEVICE).cumsum(0).to(torch.int32)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    weight = (torch.randn(held, n, k, device=DEVICE) * k ** -0.5).to(dtype)
    before = torch.randn(rows, n, device=DEVICE).to(dtype)  # what the rows of other experts must keep
    want, mine = _dense(x, weight, counts, first)
    for impl in (ref, tri):
        out = before.clone()
        assert impl.moe_grouped_mm(x, weight, offsets, first, out) is out
        torch.testing.assert_close(out[mine].double(), want[mine], **TOL[dtype])
        assert torch.equal(out[~mine], before[~mine]), impl.__name__


def _mixtral(backend: str, parallel: Parallel | None = None) -> CausalLM:
    # std 0.15: routing far from uniform, so the experts' weights tell in the output
    config = ModelConfig.from_spec(tiny_spec("mixtral"))
    model = CausalLM(config, get_ops(backend), parallel or Parallel(), torch.float32, DEVICE)
    model.init_random(seed=1, std=0.15)
    return model


def _inputs() -> StepInputs:
    gen = torch.Generator().manual_seed(2)
    prompts = {seq: torch.randint(0, 128, (n,), generator=gen).tolist() for seq, n in enumerate((9, 23, 1))}
    inputs = PagedBatch(16, 16).step(prompts, all_logits=True)
    return StepInputs(**{name: t.to(DEVICE) for name, t in vars(inputs).items()})


def _guard_host_syncs(monkeypatch) -> list:
    """Make tolist, item and cpu raise while an MoE layer runs; returns the list of its calls."""
    calls, forward = [], MoE.forward

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"MoE.forward synced with the host: Tensor.{name}")
        return method

    def guarded(self, x, step):
        calls.append(x.shape[0])
        with monkeypatch.context() as m:
            for name in ("tolist", "item", "cpu"):
                m.setattr(torch.Tensor, name, refuse(name))
            return forward(self, x, step)

    monkeypatch.setattr(MoE, "forward", guarded)
    return calls


def test_the_moe_layer_makes_no_host_sync_with_the_triton_kernels(monkeypatch):
    inputs = _inputs()
    models = {backend: _mixtral(backend) for backend in ("torch", "triton")}

    def run(backend):
        model = models[backend]
        return model(inputs, model.make_kv_cache(16, 16), HeapWorkspace(DEVICE))

    want = run("torch")
    calls = _guard_host_syncs(monkeypatch)
    got = run("triton")
    assert calls == [33] * 2  # both layers ran under the guard
    torch.testing.assert_close(got, want, **MODEL_TOL)
    # the guard does catch a sync: the torch reference reads the offsets on the host
    with pytest.raises(AssertionError, match="Tensor.tolist"):
        run("torch")


class _NaNWorkspace(HeapWorkspace):
    """Fresh buffers full of NaN (-1 for integers): a row the layer leaves unwritten shows."""

    def buffer(self, name, shape, dtype):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=self.device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_parallel_ranks_sum_to_the_one_rank_layer(backend, monkeypatch):
    """ep 2 over tp 2: each rank computes the rows of its own experts only (the others' rows hold
    NaN from the workspace, which the mask must keep out), and the ranks' outputs, summed as the
    all-reduce sums them, are the one-rank layer's."""
    monkeypatch.setattr(Parallel, "all_reduce", lambda self, t: t)  # each rank's partial sum
    whole = _mixtral(backend).layers[0].mlp
    x = torch.randn(13, whole.config.hidden, device=DEVICE)
    step = _Step(inputs=None, kv=None, workspace=_NaNWorkspace(DEVICE), cos_sin=None)
    want = whole(x, step).clone()
    ranks = [_mixtral(backend, Parallel(tp_rank=r, tp_size=2, ep_size=2)).layers[0].mlp for r in range(2)]
    assert [moe.layout.experts for moe in ranks] == [range(0, 2), range(2, 4)]
    got = sum(moe(x, step).clone() for moe in ranks)
    torch.testing.assert_close(got, want, **MODEL_TOL)
