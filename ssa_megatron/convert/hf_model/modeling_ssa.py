"""SSA (Sparse Sparse Attention) causal LM for Hugging Face transformers, exported by ssa_megatron.

Self-contained (torch + transformers only), loaded with ``trust_remote_code=True``. A Llama decoder
(RMSNorm, RoPE, GQA, SwiGLU) whose attention heads are scaled by a head-wise sigmoid gate
``sigmoid(g_proj(x))`` before ``o_proj``, and whose attention runs in one of two modes:

- ``full``: causal softmax attention (PyTorch SDPA);
- ``sparse``: the block-sparse attention the model was trained with. Keys are split into blocks of
  ``block_size`` tokens; each block's key is the mean of its post-RoPE keys. For every token and KV
  head, the importance of each block strictly before the token's own block is the per-head softmax
  of ``q . k_block / sqrt(d)``, normalised over the blocks complete at the token, summed over the
  query heads of the KV group (float32). The token attends to its own block (causally) and the
  ``top_k - 1`` most important earlier blocks (exact top-k), never building ``[seq, seq]``.

Notation: b batch, n new tokens, hq/hkv query/KV heads, g = hq // hkv, d head dim, bs block size.

Generation keeps an ``SSACache``: keys/values and, for sparse mode, the mean-pooled block keys of
every complete block (updated as blocks complete), so a token decoded with the cache selects and
attends exactly as an uncached forward over the same tokens. Rows are stored *logically*: a
left-padded batch is shifted so that every row's first real token sits at index 0, which keeps the
block grid of each row where training had it (batched left-padded generation equals one prompt at a
time). With ``ssa_kernels`` importable (``pip install ssa-megatron``) and CUDA tensors, sparse
prefill runs its Triton kernels (``sparse_backend="auto"``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_ssa import SPARSE_BACKENDS, SSAConfig, check_attention_args

logger = logging.get_logger(__name__)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
_KERNELS = None  # the ssa_kernels module once imported, False when it is not importable


def _triton_kernels():
    global _KERNELS
    if _KERNELS is None:
        try:
            import ssa_kernels

            _KERNELS = ssa_kernels
        except Exception:  # not installed, or triton unusable here
            _KERNELS = False
    return _KERNELS or None


# ------------------------------------------------------------------------------------------------
# The attention math (torch). q [b, n, hq, d]; caches [b, hkv, cap, d]; block keys [b, nb, hkv, d].
# ------------------------------------------------------------------------------------------------


def block_means(k_buf: torch.Tensor, first_block: torch.Tensor, count: int, block_size: int) -> torch.Tensor:
    """Mean (float32) of the keys of blocks ``first_block[b] + i``, i < count: ``[b, count, hkv, d]``."""
    b, hkv, cap, d = k_buf.shape
    blocks = first_block[:, None] + torch.arange(count, device=k_buf.device)  # [b, count]
    tokens = (blocks[..., None] * block_size + torch.arange(block_size, device=k_buf.device)).clamp(max=cap - 1)
    batch = torch.arange(b, device=k_buf.device)[:, None, None]
    keys = k_buf.transpose(1, 2)[batch, tokens]  # [b, count, bs, hkv, d]
    return keys.float().mean(dim=2)


def select_blocks_at(
    q: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, block_size: int, top_k: int
) -> torch.Tensor:
    """Blocks attended by the tokens at ``positions`` ``[b, c]``: ``[b, c, hkv, 1 + picks]`` int64.

    Slot 0 is the own block; then the most important earlier blocks, descending; -1 = none left.
    ``k_cmp [b, nb, hkv, d]`` (float32) must hold the true mean of every block complete at each
    position (entries past that are never read).
    """
    b, c, hq, d = q.shape
    nb, hkv = k_cmp.shape[1], k_cmp.shape[2]
    own = (positions // block_size)[:, :, None, None].expand(b, c, hkv, 1)
    n_pick = min(top_k - 1, nb)
    if n_pick <= 0:
        return own
    scale = 1.0 / math.sqrt(d)
    # [b, c, hkv, g, d] x [b, nb, hkv, d] -> [b, c, hkv, g, nb]
    scores = torch.einsum("bchgd,bnhd->bchgn", q.float().reshape(b, c, hkv, hq // hkv, d), k_cmp) * scale
    blocks = torch.arange(nb, device=q.device)
    complete = blocks < ((positions + 1) // block_size)[..., None]  # [b, c, nb]
    earlier = blocks < (positions // block_size)[..., None]
    lse = scores.masked_fill(~complete[:, :, None, None], float("-inf")).logsumexp(dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(~earlier[:, :, None, None], 0.0)
    importance = probs.sum(dim=3).masked_fill(~earlier[:, :, None], float("-inf"))  # [b, c, hkv, nb]
    values, picked = importance.topk(n_pick, dim=-1)
    return torch.cat([own, picked.masked_fill(values == float("-inf"), -1)], dim=-1)


def attend_selected(
    q: torch.Tensor, positions: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, idx: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Softmax attention of q ``[b, c, hq, d]`` over the tokens of blocks ``idx [b, c, hkv, slots]``,
    keys after each query's position masked. Returns ``[b, c, hq, d]`` in q's dtype."""
    b, c, hq, d = q.shape
    hkv, cap = k_buf.shape[1], k_buf.shape[2]
    offsets = torch.arange(block_size, device=q.device)
    tokens = (idx.clamp(min=0)[..., None] * block_size + offsets).flatten(-2)  # [b, c, hkv, slots * bs]
    valid = (idx[..., None] >= 0).expand(-1, -1, -1, -1, block_size).flatten(-2)
    valid = valid & (tokens <= positions[:, :, None, None])
    tokens = tokens.clamp(max=cap - 1)
    batch = torch.arange(b, device=q.device)[:, None, None, None]
    head = torch.arange(hkv, device=q.device)[None, None, :, None]
    acc = torch.promote_types(q.dtype, torch.float32)
    k_sel = k_buf[batch, head, tokens].to(acc)  # [b, c, hkv, slots * bs, d]
    v_sel = v_buf[batch, head, tokens].to(acc)
    scores = torch.einsum("bchgd,bchnd->bchgn", q.to(acc).reshape(b, c, hkv, hq // hkv, d), k_sel) / math.sqrt(d)
    probs = scores.masked_fill(~valid[:, :, :, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bchgn,bchnd->bchgd", probs, v_sel).reshape(b, c, hq, d).to(q.dtype)


def sparse_attention_at(
    q: torch.Tensor,
    positions: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    top_k: int,
) -> torch.Tensor:
    """Block-sparse attention of q ``[b, n, hq, d]`` at logical ``positions [b, n]``, chunked over
    queries so memory stays ``O(chunk * (nb + top_k * bs))``. Returns ``[b, n, hq, d]``."""
    b, n, hq, d = q.shape
    hkv, nb = k_buf.shape[1], k_cmp.shape[1]
    per_query = b * max(hq * max(nb, 1), hkv * top_k * block_size * d)
    chunk = max(16, min(1024, (1 << 25) // per_query))
    out = []
    for start in range(0, n, chunk):
        qc, pc = q[:, start : start + chunk], positions[:, start : start + chunk]
        idx = select_blocks_at(qc, pc, k_cmp, block_size, top_k)
        out.append(attend_selected(qc, pc, k_buf, v_buf, idx, block_size))
    return torch.cat(out, dim=1)


def sparse_decode_step(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, k_cmp: torch.Tensor, length: int, block_size: int, top_k: int
) -> torch.Tensor:
    """``sparse_attention_at`` for one new token per row when every row holds ``length`` tokens (the new
    one last), so that every count is a host int: no masks, no index tensors of context size, no host
    syncs. Same selection (same importance, same top-k over the same blocks) and same attended tokens,
    in the same order. q ``[b, 1, hq, d]``, k_cmp ``[b, length // bs, hkv, d]``; returns ``[b, 1, hq, d]``."""
    b, _, hq, d = q.shape
    hkv = k_buf.shape[1]
    g = hq // hkv
    nb = k_cmp.shape[1]  # every block in k_cmp is complete
    own = (length - 1) // block_size  # the new token's block; blocks 0 .. own - 1 are the earlier ones
    n_pick = min(top_k - 1, nb)
    n_valid = min(n_pick, own)  # picks that name a block (the rest would be -1)
    acc = torch.promote_types(q.dtype, torch.float32)
    keys, values = k_buf[:, :, own * block_size : length], v_buf[:, :, own * block_size : length]
    if n_valid > 0:
        scale = 1.0 / math.sqrt(d)
        scores = torch.matmul(q.float().view(b, hkv, g, d), k_cmp.permute(0, 2, 3, 1)) * scale  # [b, hkv, g, nb]
        probs = torch.exp(scores - scores.logsumexp(dim=-1, keepdim=True))
        importance = probs.sum(dim=2)  # [b, hkv, nb]
        if own < nb:
            importance[..., own:] = float("-inf")  # the own block is not an earlier block
        picked = importance.topk(n_pick, dim=-1)[1][..., :n_valid]  # descending; -inf ones (never valid) last
        offsets = torch.arange(block_size, device=q.device)
        tokens = (picked[..., None] * block_size + offsets).flatten(-2)[..., None].expand(-1, -1, -1, d)
        keys = torch.cat([keys, torch.gather(k_buf, 2, tokens)], dim=2)  # [b, hkv, own part + n_valid * bs, d]
        values = torch.cat([values, torch.gather(v_buf, 2, tokens)], dim=2)
    scores = torch.matmul(q.to(acc).view(b, hkv, g, d), keys.to(acc).transpose(-1, -2)) / math.sqrt(d)
    out = torch.matmul(scores.softmax(dim=-1), values.to(acc))  # [b, hkv, g, d]
    return out.reshape(b, 1, hq, d).to(q.dtype)


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------


class SSALayerCache:
    """Keys/values ``[b, hkv, cap, d]`` of one layer (logical rows) and its mean-pooled block keys."""

    def __init__(self):
        self.k = self.v = None
        self.k_cmp = None  # [b, cap // bs + 1, hkv, d] float32
        self.cmp_block_size = None
        self.cmp_upto = None  # [b]: row lengths when k_cmp was last brought up to date
        self.cmp_stale = 0  # tokens appended to every row since then
        self.cmp_upto_host = None  # kv_len at that update when every row had it (uniform rows), else None

    def append(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, needed: int, start: int | None = None
    ) -> None:
        """Write k/v ``[b, n, hkv, d]`` at ``positions [b, n]``; ``needed`` bounds every index + 1.
        ``start``: when every row's positions are ``start .. start + n - 1`` (known on the host), the
        write is a plain slice copy (no index tensors)."""
        b, n, hkv, d = k.shape
        if self.k is None or self.k.shape[2] < needed:
            old = 0 if self.k is None else self.k.shape[2]
            cap = needed if self.k is None else max(needed, old + max(256, old // 8))
            grown_k = k.new_zeros(b, hkv, cap, d)
            grown_v = v.new_zeros(b, hkv, cap, d)
            if self.k is not None:
                grown_k[:, :, :old], grown_v[:, :, :old] = self.k, self.v
            self.k, self.v = grown_k, grown_v
        if start is not None:
            self.k[:, :, start : start + n].copy_(k.transpose(1, 2))
            self.v[:, :, start : start + n].copy_(v.transpose(1, 2))
        else:
            batch = torch.arange(b, device=k.device)[:, None]
            # [b, hkv, cap, d] viewed as [b, cap, hkv, d] for the per-row token index
            self.k.transpose(1, 2)[batch, positions] = k
            self.v.transpose(1, 2)[batch, positions] = v
        self.cmp_stale += n

    def block_keys(self, block_size: int, lengths: torch.Tensor, kv_len: int, uniform: bool = False) -> torch.Tensor:
        """Mean-pooled keys ``[b, kv_len // bs, hkv, d]``, true for every block complete in each row.
        ``uniform``: every row holds ``kv_len`` tokens, so the host knows when a block completes."""
        b, hkv, cap, d = self.k.shape
        rows = cap // block_size + 1
        if self.cmp_block_size != block_size or self.k_cmp is None:
            self.k_cmp = self.k.new_zeros(b, rows, hkv, d, dtype=torch.float32)
            self.cmp_block_size = block_size
            self.cmp_upto = torch.zeros_like(lengths)
            self.cmp_upto_host = None
            self.cmp_stale = kv_len
        elif self.k_cmp.shape[1] < rows:
            grown = self.k_cmp.new_zeros(b, rows, hkv, d)
            grown[:, : self.k_cmp.shape[1]] = self.k_cmp
            self.k_cmp = grown
        if uniform and self.cmp_upto_host is not None and kv_len // block_size == self.cmp_upto_host // block_size:
            pass  # no block completed since the last update: the complete blocks' means are all in place
        elif self.cmp_stale:
            # Blocks completed since the last update: [cmp_upto // bs, lengths // bs) per row, at most
            # stale // bs + 1 of them. Recompute them all (entries not complete yet are rewritten later).
            count = self.cmp_stale // block_size + 1
            first = self.cmp_upto // block_size
            means = block_means(self.k, first, count, block_size)  # [b, count, hkv, d]
            blocks = first[:, None] + torch.arange(count, device=first.device)
            batch = torch.arange(b, device=first.device)[:, None]
            self.k_cmp[batch, blocks.clamp(max=rows - 1)] = torch.where(
                (blocks < rows)[..., None, None], means, self.k_cmp[batch, blocks.clamp(max=rows - 1)]
            )
            self.cmp_upto = lengths.clone()
            self.cmp_upto_host = kv_len if uniform else None
            self.cmp_stale = 0
        return self.k_cmp[:, : kv_len // block_size]

    def select(self, index: torch.Tensor) -> None:
        for name in ("k", "v", "k_cmp", "cmp_upto"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))


class SSACache:
    """KV cache of an SSA model (both attention modes). Made by the model; pass it back to continue.

    ``lengths [b]``: real tokens of each row; ``seen``: input columns consumed (left padding included).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.layers = [SSALayerCache() for _ in range(num_layers)]
        self.lengths: torch.Tensor | None = None
        self.seen = 0
        self.uniform = True

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return len(self.layers)

    def memory_bytes(self) -> int:
        """Bytes held by the cache tensors (allocated capacity)."""
        total = 0
        for layer in self.layers:
            for t in (layer.k, layer.v, layer.k_cmp):
                total += 0 if t is None else t.numel() * t.element_size()
        return total

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep rows ``beam_idx`` (beam search)."""
        for layer in self.layers:
            layer.select(beam_idx)
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, beam_idx)

    batch_select_indices = reorder_cache


@dataclass
class _Step:
    """What every layer of one forward shares."""

    mode: str
    block_size: int
    top_k: int
    backend: str
    positions: torch.Tensor  # [b, n] logical positions of the new tokens
    lengths: torch.Tensor  # [b] real tokens per row after this step
    kv_len: int  # bound on every written cache index + 1
    prefill: bool  # the cache was empty: queries are 0..n-1 in every row
    uniform: bool  # every row has the same length (no left padding)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


class SSARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[b, n, d]`` for positions ``[b, n]`` (non-interleaved halves, as Llama and Megatron)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[b, n, h, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class SSAAttention(nn.Module):
    def __init__(self, config: SSAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # Head-wise output gate: one scalar per query head and token.
        self.g_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    def forward(self, x: torch.Tensor, cos, sin, cache: SSALayerCache, step: _Step) -> torch.Tensor:
        b, n, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        gate = torch.sigmoid(self.g_proj(x).float()).to(x.dtype)  # [b, n, hq]
        cache.append(k, v, step.positions, step.kv_len, step.kv_len - n if step.uniform else None)
        if step.mode == "full":
            o = self._full(q, k, v, cache, step)
        else:
            o = self._sparse(q, k, v, cache, step)
        o = o * gate[..., None].to(o.dtype)  # [b, n, hq, d]
        return self.o_proj(o.reshape(b, n, self.num_heads * self.head_dim))

    def _full(self, q, k, v, cache, step) -> torch.Tensor:
        if step.prefill:  # keys are exactly the new tokens, rows aligned at 0: plain causal attention
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )
            return o.transpose(1, 2)
        keys, values = cache.k[:, :, : step.kv_len], cache.v[:, :, : step.kv_len]
        b, n, hq, d = q.shape
        if n == 1:  # one token per row: the g query heads of a KV group attend as g rows of one head (no GQA)
            mask = None
            if not step.uniform:
                key_index = torch.arange(step.kv_len, device=q.device)
                mask = (key_index <= step.positions[..., None])[:, None]  # [b, 1, 1, kv_len]
            o = F.scaled_dot_product_attention(q.view(b, self.num_kv_heads, hq // self.num_kv_heads, d), keys, values,
                                               attn_mask=mask)
            return o.view(b, 1, hq, d)
        mask = None
        if q.shape[1] > 1 or not step.uniform:
            key_index = torch.arange(step.kv_len, device=q.device)
            mask = (key_index <= step.positions[..., None])[:, None]  # [b, 1, n, kv_len]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2)

    def _sparse(self, q, k, v, cache, step) -> torch.Tensor:
        if step.prefill and step.backend != "torch" and q.is_cuda and q.dtype != torch.float64:
            kernels = _triton_kernels()
            if kernels is not None:
                idx = kernels.select_blocks(q, k, step.block_size, step.top_k)
                o = kernels.sparse_attention(q, k, v, idx, step.block_size)
                cache.block_keys(step.block_size, step.lengths, step.kv_len)  # keep decoding ready
                return o
            if step.backend == "triton":
                raise ValueError("sparse_backend='triton' needs the ssa_kernels package: pip install ssa-megatron")
        k_cmp = cache.block_keys(step.block_size, step.lengths, step.kv_len, step.uniform)
        if q.shape[1] == 1 and step.uniform:
            return sparse_decode_step(q, cache.k, cache.v, k_cmp, step.kv_len, step.block_size, step.top_k)
        return sparse_attention_at(q, step.positions, cache.k, cache.v, k_cmp, step.block_size, step.top_k)


class SSAMLP(nn.Module):
    def __init__(self, config: SSAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SSADecoderLayer(nn.Module):
    def __init__(self, config: SSAConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SSAAttention(config, layer_idx)
        self.post_attention_layernorm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SSAMLP(config)

    def forward(self, x, cos, sin, cache, step):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class SSAPreTrainedModel(PreTrainedModel):
    config_class = SSAConfig
    base_model_prefix = "model"
    _no_split_modules = ["SSADecoderLayer"]
    supports_gradient_checkpointing = False


def _left_pad_counts(attention_mask: torch.Tensor, n: int) -> torch.Tensor | None:
    """Left-padding length of every row, None without padding. Other padding is refused."""
    if attention_mask.dim() != 2 or attention_mask.shape[1] != n:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)}: expected [batch, {n}] (2-D, one entry per input token)"
        )
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool(mask[:, -1].all()):
        raise ValueError(
            "attention_mask: only left padding is supported (each row: zeros, then ones, at least one token); "
            "use tokenizer.padding_side = 'left'"
        )
    return (~mask).sum(dim=1)


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = x[b, (i + shift[b]) % n]`` along dim 1."""
    n = x.shape[1]
    index = (torch.arange(n, device=x.device)[None, :] + shift[:, None]) % n
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _decode_sdpa_backends(x: torch.Tensor, mode: str, prefill: bool):
    """While decoding on CUDA with full attention, leave cuDNN out of SDPA's choice. Its kernels are
    built (and cached) per shape, and the key length grows by one every step: each step would build a
    new cuDNN graph in every layer (about 4 ms each on an H200, more than the whole step's GPU work).
    The other enabled backends (flash, memory-efficient, math) take any length as is."""
    cuda = torch.backends.cuda
    if prefill or mode != "full" or not x.is_cuda or not cuda.cudnn_sdp_enabled():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    others = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, cuda.math_sdp_enabled()),
        )
        if enabled
    ]
    return sdpa_kernel(others) if others else contextlib.nullcontext()


class SSAModel(SSAPreTrainedModel):
    def __init__(self, config: SSAConfig):
        super().__init__(config)
        check_attention_args(config.attention_mode, config.block_size, config.top_k)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SSADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        cache: SSACache | None = None,
        inputs_embeds=None,
        attention_mode: str | None = None,
        block_size: int | None = None,
        top_k: int | None = None,
        output_hidden_states: bool = False,
    ):
        """Returns ``(hidden [b, n, h], cache, all hidden states or None)``; rows in the input's layout."""
        c = self.config
        mode = c.attention_mode if attention_mode is None else attention_mode
        block_size = c.block_size if block_size is None else block_size
        top_k = c.top_k if top_k is None else top_k
        check_attention_args(mode, block_size, top_k)
        backend = getattr(c, "sparse_backend", "auto")
        if backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend={backend!r}: must be one of {SPARSE_BACKENDS}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        if cache is None:
            cache = SSACache(len(self.layers))
        prefill = cache.seen == 0
        arange = torch.arange(n, device=x.device)
        shift = None
        if prefill:
            if attention_mask is not None:
                shift = _left_pad_counts(attention_mask, n)
            if shift is not None:
                x = _roll_rows(x, shift)  # every row's first real token at index 0
                lengths = n - shift
            else:
                lengths = torch.full((b,), n, dtype=torch.long, device=x.device)
            positions = arange[None].expand(b, n)
            uniform = shift is None
        else:
            if cache.lengths.shape[0] != b:
                raise ValueError(f"batch size {b} does not match the cache's {cache.lengths.shape[0]}")
            positions = cache.lengths[:, None] + arange
            lengths = cache.lengths + n
            uniform = cache.uniform
        step = _Step(mode, block_size, top_k, backend, positions, lengths, cache.seen + n, prefill, uniform)
        cos, sin = rotary(positions, c.head_dim, c.rope_theta, x.dtype)
        hidden = [] if output_hidden_states else None
        with _decode_sdpa_backends(x, mode, prefill):
            for layer, layer_cache in zip(self.layers, cache.layers):
                if hidden is not None:
                    hidden.append(x)
                x = layer(x, cos, sin, layer_cache, step)
        x = self.norm(x)
        cache.lengths, cache.seen, cache.uniform = lengths, cache.seen + n, uniform
        if hidden is not None:
            hidden.append(x)
        if shift is not None:  # back to the input's layout (padding positions hold padding outputs)
            x = _roll_rows(x, -shift)
            hidden = None if hidden is None else [_roll_rows(h, -shift) for h in hidden]
        return x, cache, None if hidden is None else tuple(hidden)


if _TRANSFORMERS_MAJOR >= 5:

    @dataclass
    class SSACausalLMOutput(ModelOutput):
        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        cache: SSACache | None = None
        hidden_states: tuple | None = None

    _CACHE_FIELD = "cache"
else:  # transformers 4 names the cache past_key_values

    @dataclass
    class SSACausalLMOutput(ModelOutput):
        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        past_key_values: SSACache | None = None
        hidden_states: tuple | None = None

    _CACHE_FIELD = "past_key_values"


# Per-call overrides. In generate(), ``top_k`` is the sampling parameter: pass ``sparse_top_k`` there.
_PER_CALL = ("attention_mode", "block_size", "sparse_top_k")


class SSAForCausalLM(SSAPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: SSAConfig):
        super().__init__(config)
        self.model = SSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # A generation config derived from this model config would read the attention budget
        # ``top_k`` as the sampling top-k: reset it (generation_config.json, when loaded, replaces this).
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None and generation_config.top_k == config.top_k:
            generation_config.top_k = GenerationConfig().top_k

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own SSACache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SSACache | None = None,
        past_key_values: SSACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        attention_mode: str | None = None,
        block_size: int | None = None,
        top_k: int | None = None,
        sparse_top_k: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **unused,
    ) -> SSACausalLMOutput:
        """``attention_mode``/``block_size``/``top_k`` (alias ``sparse_top_k``) override the config for
        this call. ``position_ids`` is accepted for API compatibility and ignored: positions follow the
        attention mask (left padding) and the cache, as the block grid must."""
        if top_k is not None and sparse_top_k is not None and top_k != sparse_top_k:
            raise ValueError(f"top_k={top_k} and sparse_top_k={sparse_top_k} disagree: pass one")
        top_k = sparse_top_k if top_k is None else top_k
        if output_attentions:
            raise ValueError("output_attentions is not supported by SSA models (sparse attention has no [seq, seq] map)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SSACache):
            raise ValueError(f"cache must be an SSACache made by this model, got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache, all_hidden = self.model(
            input_ids, attention_mask, cache, inputs_embeds, attention_mode, block_size, top_k, bool(output_hidden_states)
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out_cache = cache if use_cache else None
        output = SSACausalLMOutput(loss=loss, logits=logits, hidden_states=all_hidden, **{_CACHE_FIELD: out_cache})
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, cache=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feed only the tokens the cache has not seen; the cache and mask carry the rest."""
        cache = cache if cache is not None else past_key_values
        seen = cache.seen if isinstance(cache, SSACache) else 0
        inputs = {"attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        for key in (*_PER_CALL, "logits_to_keep", "output_hidden_states"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache
