"""select_blocks (Triton) picks exactly the oracle's top-k blocks, in the oracle's slot order."""

from __future__ import annotations

import pytest
import torch
import triton
from kernel_cases import CASES, DEVICE, ON_GPU, Case

import ssa_kernels
from ssa_kernels import select as select_mod
from ssa_megatron import ops
from ssa_megatron.ops import reference


def oracle_importance(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, s, hkv, nbc] float32 importance of the torch reference, -inf where not an earlier block."""
    positions = torch.arange(q.shape[1], device=q.device)
    return reference.block_importance(q.float(), reference.mean_pool_blocks(k.float(), block_size), positions, block_size)


def assert_exact_top_k(idx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, rtol: float,
                       min_same: float = 0.98):
    """Same own block, same -1 padding, and the chosen blocks' importances equal the true top-k's.

    Sets may differ only by near-ties: then the importance values (sorted) still agree to rtol.
    """
    ref = reference.select_blocks(q.float(), k.float(), block_size, top_k)
    assert idx.shape == ref.shape and idx.dtype == torch.int64
    own = torch.arange(q.shape[1], device=q.device) // block_size
    assert torch.equal(idx[..., 0], own[None, :, None].expand_as(idx[..., 0]))
    assert torch.equal(idx[..., 1:] >= 0, ref[..., 1:] >= 0), "different number of picked blocks"
    if top_k == 1 or q.shape[1] < block_size:
        return
    imp = oracle_importance(q, k, block_size)
    pick = lambda sel: imp.gather(-1, sel[..., 1:].clamp(min=0)).masked_fill(sel[..., 1:] < 0, 0.0)
    ours, theirs = pick(idx), pick(ref)
    assert torch.isfinite(ours).all(), "picked a block that is not strictly earlier"
    torch.testing.assert_close(ours.sort(-1).values, theirs.sort(-1).values, rtol=rtol, atol=1e-7)
    # slots 1.. in descending importance (up to the same tolerance)
    assert (ours[..., 1:] <= ours[..., :-1] * (1 + rtol) + 1e-7).all()
    # distinct blocks per row
    valid = idx[..., 1:].clamp(min=-1)
    srt = valid.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()
    same = (idx[..., 1:].sort(-1).values == ref[..., 1:].sort(-1).values).all(-1).float().mean().item()
    assert same >= min_same, f"only {same:.3f} of rows pick the oracle's exact set"


@pytest.mark.parametrize("case", CASES)
def test_select_blocks_matches_oracle_top_k(case: Case):
    q, k, _ = case.inputs(seed=1)
    idx = ssa_kernels.select_blocks(q, k, case.block_size, case.top_k)
    assert_exact_top_k(idx, q, k, case.block_size, case.top_k, rtol=2e-4)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(Case(1, 300, 4, 2, 16, 16, 2, torch.float32), id="k2-one-slot"),
        pytest.param(Case(1, 1100, 2, 1, 16, 16, 40, torch.float32), id="k40-carry-equals-chunk"),
        pytest.param(Case(1, 1300, 4, 1, 16, 16, 70, torch.float16), id="k70-carry-wider-than-chunk"),
    ],
)
def test_select_blocks_carried_top_k_widths(case: Case):
    q, k, _ = case.inputs(seed=11)
    idx = ssa_kernels.select_blocks(q, k, case.block_size, case.top_k)
    assert_exact_top_k(idx, q, k, case.block_size, case.top_k, rtol=2e-4)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(Case(1, 300, 16, 1, 64, 16, 16, torch.float32), id="g16-d64-k16"),
        pytest.param(Case(1, 200, 16, 2, 128, 16, 8, torch.float32), id="g8-d128-k8"),
        pytest.param(Case(1, 260, 32, 2, 128, 16, 5, torch.float16), id="g16-d128-k5-fp16"),
        pytest.param(Case(1, 200, 32, 1, 16, 16, 5, torch.float32), id="g32-four-row-subtiles"),
        pytest.param(Case(1, 1500, 16, 2, 64, 16, 16, torch.bfloat16), id="g8-d64-k16-bf16", marks=pytest.mark.skipif(
            not ON_GPU, reason="bf16 on GPU only")),
    ],
)
def test_select_blocks_group_sizes_and_head_dims(case: Case):
    """The 1B layer's group (16 query heads per KV head), 8 and 32, head_dim 64 and 128."""
    q, k, _ = case.inputs(seed=12)
    idx = ssa_kernels.select_blocks(q, k, case.block_size, case.top_k)
    assert_exact_top_k(idx, q, k, case.block_size, case.top_k, rtol=2e-4)


@pytest.mark.parametrize("top_k", [10, 11, 12])
def test_select_blocks_top_k_near_the_number_of_blocks(top_k: int):
    """The last token has 10 earlier blocks: one more than, as many as, one fewer than the slots."""
    case = Case(1, 165, 8, 1, 32, 16, top_k, torch.float32)
    q, k, _ = case.inputs(seed=13)
    idx = ssa_kernels.select_blocks(q, k, 16, top_k)
    assert_exact_top_k(idx, q, k, 16, top_k, rtol=2e-4)
    last = idx[0, -1, 0, 1:].tolist()
    if top_k - 1 >= 10:  # the budget covers every earlier block: all of them, then -1
        assert sorted(last[:10]) == list(range(10)) and last[10:] == [-1] * (top_k - 11)


def test_select_blocks_ties_pick_distinct_blocks():
    """Blocks with bit-identical keys tie exactly: each pick is a distinct block of the top importance."""
    b, s, hq, hkv, d, bs = 1, 256, 8, 1, 32, 16
    g = torch.Generator().manual_seed(14)
    q = torch.randn(b, s, hq, d, generator=g)
    # 16 blocks: blocks 0-5 share one key block, 6-9 another, 10-15 are distinct
    blocks = torch.randn(b, 16, bs, hkv, d, generator=g)
    blocks[:, 1:6] = blocks[:, :1]
    blocks[:, 7:10] = blocks[:, 6:7]
    k = blocks.reshape(b, s, hkv, d)
    q, k = q.to(DEVICE), k.to(DEVICE)
    for top_k in (3, 6, 9):
        idx = ssa_kernels.select_blocks(q, k, bs, top_k)
        assert_exact_top_k(idx, q, k, bs, top_k, rtol=2e-4, min_same=0.0)
    # a single repeated block: every earlier block ties with every other
    k_all = blocks[:, :1].expand(b, 16, bs, hkv, d).reshape(b, s, hkv, d).contiguous().to(DEVICE)
    idx = ssa_kernels.select_blocks(q, k_all, bs, 8)
    assert_exact_top_k(idx, q, k_all, bs, 8, rtol=2e-4, min_same=0.0)


def _candidates():
    """(kernel, config) pairs to run: every autotune candidate on a GPU; on CPU, where warps and stages
    do nothing, the distinct tile shapes, and 128-block chunks (the shape top_k - 1 > 64 runs)."""
    pairs = [("lse_kernel", c) for c in select_mod.LSE_CANDIDATES]
    pairs += [("select_blocks_kernel", c) for c in select_mod.CANDIDATES]
    if ON_GPU:
        return pairs
    pairs += [(name, triton.Config({"TOK": 16, "LOG_NC": 7})) for name in ("lse_kernel", "select_blocks_kernel")]
    return list({(name, tuple(sorted(c.kwargs.items()))): (name, c) for name, c in pairs}.values())


def _config_id(x) -> str:
    if isinstance(x, str):
        return x
    return "-".join(f"{k}{v}" for k, v in x.kwargs.items()) + f"-w{x.num_warps}-s{x.num_stages}-r{x.maxnreg}"


@pytest.mark.parametrize("name, cfg", _candidates(), ids=_config_id)
def test_select_blocks_every_autotune_candidate(name, cfg):
    """Each candidate of either kernel (tile shape, warps, stages, register cap) picks the same blocks."""
    kern = getattr(select_mod, name)
    case = Case(1, 1100, 32, 2, 64, 16, 16, torch.float16)
    q, k, _ = case.inputs(seed=15)
    saved, kern.configs, kern.cache = kern.configs, [cfg], {}
    try:
        idx = ssa_kernels.select_blocks(q, k, 16, 16)
    finally:
        kern.configs, kern.cache = saved, {}
    assert_exact_top_k(idx, q, k, 16, 16, rtol=2e-4)


def test_select_blocks_top_k_one_and_short_sequence_keep_own_block_only():
    case = Case(1, 40, 4, 2, 16, 16, 1, torch.float32)
    q, k, _ = case.inputs()
    idx = ssa_kernels.select_blocks(q, k, 16, 1)
    assert torch.equal(idx[..., 0], (torch.arange(40, device=DEVICE) // 16)[None, :, None].expand(1, 40, 2))
    short = Case(1, 10, 4, 2, 16, 16, 3, torch.float32)
    q, k, _ = short.inputs()
    idx = ssa_kernels.select_blocks(q, k, 16, 3)
    assert (idx[..., 0] == 0).all() and (idx[..., 1:] == -1).all()


def test_select_blocks_reads_strided_queries():
    case = Case(2, 64, 4, 2, 16, 16, 3, torch.float32)
    q, k, _ = case.inputs(seed=3)
    q_sb = q.transpose(0, 1).contiguous().transpose(0, 1)  # Megatron's [s, b, h, d] seen as [b, s, h, d]
    assert not q_sb.is_contiguous()
    assert torch.equal(ssa_kernels.select_blocks(q_sb, k, 16, 3), ssa_kernels.select_blocks(q, k, 16, 3))


def test_select_blocks_torch_path_for_budgets_beyond_the_register_top_k():
    from ssa_kernels.select import select_blocks_torch

    case = Case(1, 150, 4, 2, 16, 16, 6, torch.float32)
    q, k, _ = case.inputs(seed=4)
    assert_exact_top_k(select_blocks_torch(q, k, 16, 6), q, k, 16, 6, rtol=1e-5)


def test_ops_triton_backend_dispatches_to_the_kernel():
    case = Case(1, 50, 4, 2, 16, 16, 3, torch.float32)
    q, k, _ = case.inputs(seed=5)
    assert torch.equal(ops.select_blocks(q, k, 16, 3, backend="triton"), ssa_kernels.select_blocks(q, k, 16, 3))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q, k[:, :-1], 16, 3), id="seq-mismatch"),
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q[:, :, :3], k, 16, 3), id="heads-not-multiple"),
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q, k, 0, 3), id="block-size-zero"),
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q, k, 16, 0), id="top-k-zero"),
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q, k.half(), 16, 3), id="dtype-mismatch"),
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q[..., :12], k[..., :12], 16, 3), id="head-dim-12"),
        pytest.param(lambda q, k: ssa_kernels.select_blocks(q[0], k[0], 16, 3), id="3d"),
    ],
)
def test_select_blocks_refuses_bad_input(bad):
    q, k, _ = Case(1, 32, 4, 2, 16, 16, 3, torch.float32).inputs()
    with pytest.raises(ValueError):
        bad(q, k)
