"""Bad arguments to the public SSA ops raise ``ValueError`` naming the argument (issue 2)."""

from __future__ import annotations

import pytest
import torch

from ssa_megatron import ops

B, S, HQ, HKV, D, BS = 1, 12, 4, 2, 8, 4


def _q(**kw):
    return torch.randn(B, S, HQ, D, **kw)


def _kv(**kw):
    return torch.randn(B, S, HKV, D, **kw)


def _idx(top_k=2, **kw):
    return torch.zeros(B, S, HKV, top_k, dtype=kw.pop("dtype", torch.int64), **kw)


CASES = [
    # ---- q / k / v: rank, type, dtype, device, shapes, head counts
    pytest.param(lambda: ops.full_attention(torch.randn(S, HQ, D), _kv(), _kv()), r"q must be 4-D", id="q-3d"),
    pytest.param(lambda: ops.select_blocks(_q(), torch.randn(B, S, HKV, D, 1), BS, 2), r"k must be 4-D", id="k-5d"),
    pytest.param(lambda: ops.full_attention(_q().tolist(), _kv(), _kv()), r"q must be a torch.Tensor", id="q-list"),
    pytest.param(
        lambda: ops.full_attention(torch.ones(B, S, HQ, D, dtype=torch.int64), _kv(), _kv()),
        r"q must be a floating tensor",
        id="q-int",
    ),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), torch.ones(B, S, HKV, D, dtype=torch.int32), _idx(), BS),
        r"v must be a floating tensor",
        id="v-int",
    ),
    pytest.param(
        lambda: ops.full_attention(_q(), _kv(dtype=torch.float64), _kv()),
        r"k is torch.float64 on cpu but q is torch.float32",
        id="k-dtype-differs-from-q",
    ),
    pytest.param(
        lambda: ops.full_attention(_q(), _kv(), _kv(dtype=torch.bfloat16)),
        r"v is torch.bfloat16 on cpu but q is torch.float32",
        id="v-dtype-differs-from-q",
    ),
    pytest.param(
        lambda: ops.select_blocks(_q(), _kv(device="meta"), BS, 2),
        r"k is torch.float32 on meta but q is torch.float32 on cpu",
        id="k-device-differs-from-q",
    ),
    pytest.param(
        lambda: ops.full_attention(torch.randn(B, S, 3, D), _kv(), _kv()),
        r"query heads \(3\) must be a multiple of key/value heads \(2\)",
        id="heads-3-over-2",
    ),
    pytest.param(
        lambda: ops.full_attention(_q(), torch.randn(B, S, 0, D), torch.randn(B, S, 0, D)),
        r"key/value heads \(0\)",
        id="zero-kv-heads",
    ),
    pytest.param(
        lambda: ops.full_attention(_q(), torch.randn(B, S + 1, HKV, D), torch.randn(B, S + 1, HKV, D)),
        r"k shape .* does not match q shape",
        id="k-seq-differs",
    ),
    pytest.param(
        lambda: ops.full_attention(_q(), torch.randn(B, S, HKV, D + 1), torch.randn(B, S, HKV, D + 1)),
        r"k shape .* does not match q shape",
        id="k-head-dim-differs",
    ),
    pytest.param(
        lambda: ops.full_attention(_q(), _kv(), torch.randn(B, S, HKV, D + 2)),
        r"v shape .* must equal k shape",
        id="v-shape-differs-from-k",
    ),
    # ---- block_size / top_k
    pytest.param(lambda: ops.select_blocks(_q(), _kv(), BS, 0), r"top_k=0", id="top_k-0"),
    pytest.param(lambda: ops.select_blocks(_q(), _kv(), BS, -3), r"top_k=-3", id="top_k-negative"),
    pytest.param(lambda: ops.select_blocks(_q(), _kv(), BS, 2.0), r"top_k=2\.0", id="top_k-float"),
    pytest.param(lambda: ops.select_blocks(_q(), _kv(), 0, 2), r"block_size=0", id="select-block_size-0"),
    pytest.param(lambda: ops.select_blocks(_q(), _kv(), 4.0, 2), r"block_size=4\.0", id="select-block_size-float"),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), _idx(), 0), r"block_size=0", id="sparse-block_size-0"
    ),
    # ---- idx
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), _idx(dtype=torch.float32), BS),
        r"idx must be an int32/int64 tensor",
        id="idx-float",
    ),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), [[0]], BS), r"idx must be an int32/int64 tensor", id="idx-list"
    ),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), torch.zeros(B, S, 2, dtype=torch.int64), BS),
        r"idx shape \(1, 12, 2\) must be \[batch, seq, kv_heads, top_k\]",
        id="idx-3d",
    ),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), torch.zeros(B, S, HQ, 2, dtype=torch.int64), BS),
        r"idx shape \(1, 12, 4, 2\) must be \[batch, seq, kv_heads, top_k\]",
        id="idx-per-query-head",
    ),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), _idx(device="meta"), BS),
        r"idx is on meta but q is on cpu",
        id="idx-device",
    ),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), _idx(), BS, deterministic="yes"),
        r"deterministic='yes': must be True or False",
        id="sparse-deterministic-str",
    ),
    # ---- backend
    pytest.param(lambda: ops.full_attention(_q(), _kv(), _kv(), backend="nope"), r"backend='nope'", id="full-nope"),
    pytest.param(lambda: ops.select_blocks(_q(), _kv(), BS, 2, backend="nope"), r"backend='nope'", id="select-nope"),
    pytest.param(
        lambda: ops.sparse_attention(_q(), _kv(), _kv(), _idx(), BS, backend="nope"),
        r"backend='nope'",
        id="sparse-nope",
    ),
    pytest.param(
        lambda: ops.alignment_loss(_q(), _q(), backend="nope"), r"backend='nope'", id="alignment-nope"
    ),
    # ---- alignment_loss
    pytest.param(
        lambda: ops.alignment_loss(_q(), torch.randn(B, S, HQ, D + 1)),
        r"o_full shape .* != o_sparse shape",
        id="alignment-shape-mismatch",
    ),
    pytest.param(
        lambda: ops.alignment_loss(_q(), torch.ones(B, S, HQ, D, dtype=torch.int64)),
        r"o_full/o_sparse must be floating",
        id="alignment-int",
    ),
    pytest.param(
        lambda: ops.alignment_loss(_q(), _q().tolist()), r"o_full and o_sparse must be tensors", id="alignment-list"
    ),
    pytest.param(
        lambda: ops.alignment_loss(_q(), _q(device="meta")),
        r"o_full is on cpu but o_sparse is on meta",
        id="alignment-device-mismatch",
    ),
]


@pytest.mark.parametrize("call,match", CASES)
def test_bad_argument_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: ops.full_attention(_q(), _kv(), _kv(), backend="triton"), id="full"),
        pytest.param(lambda: ops.select_blocks(_q(), _kv(), BS, 2, backend="triton"), id="select"),
        pytest.param(lambda: ops.sparse_attention(_q(), _kv(), _kv(), _idx(), BS, backend="triton"), id="sparse"),
    ],
)
def test_triton_backend_on_cpu_without_interpreter_is_refused(call, monkeypatch):
    # Refused whether or not triton is installed: either message names backend='triton'.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton'"):
        call()


def test_sequence_not_divisible_by_block_size_is_accepted():
    # No op requires seq % block_size == 0: the trailing partial block is attended, never scored.
    q, k, v = torch.randn(1, 13, 4, 8), torch.randn(1, 13, 2, 8), torch.randn(1, 13, 2, 8)
    idx = ops.select_blocks(q, k, 4, 2, backend="torch")
    assert idx.shape == (1, 13, 2, 2) and int(idx[0, 12, 0, 0]) == 3
    assert ops.sparse_attention(q, k, v, idx, 4, backend="torch").shape == q.shape


def test_int32_idx_is_accepted():
    q, k, v = torch.randn(1, 12, 4, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    idx = ops.select_blocks(q, k, 4, 2, backend="torch")
    out32 = ops.sparse_attention(q, k, v, idx.int(), 4, backend="torch")
    torch.testing.assert_close(out32, ops.sparse_attention(q, k, v, idx, 4, backend="torch"), atol=0, rtol=0)
