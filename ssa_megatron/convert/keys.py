"""Weight maps between Megatron's full (TP1/PP1) GPTModel state and the HF layouts. Pure torch.

Megatron names (one-process ``GPTModel``, ``ssa_megatron.train.full_state``), per global layer i:

    decoder.layers.i.input_layernorm.weight                [h]
    decoder.layers.i.self_attention.linear_qkv.weight      [hkv * (g + 2) * d, h]  per KV group: [q (g heads) | k | v]
    decoder.layers.i.self_attention.linear_gate.weight     [hq, h]
    decoder.layers.i.self_attention.linear_proj.weight     [h, hq * d]
    decoder.layers.i.pre_mlp_layernorm.weight              [h]   (TE spec: mlp.linear_fc1.layer_norm_weight)
    decoder.layers.i.mlp.linear_fc1.weight                 [2 * ffn, h]  = [gate; up]
    decoder.layers.i.mlp.linear_fc2.weight                 [h, ffn]
    embedding.word_embeddings.weight / output_layer.weight [padded vocab, h]  (output only when untied)
    decoder.final_layernorm.weight                         [h]

HF names: Llama's (``model.layers.i.self_attn.{q,k,v,o}_proj`` ...) plus ``self_attn.g_proj.weight`` ``[hq, h]``.
Every input key must be consumed: a leftover key means another architecture, and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
# Megatron's local spec names first; the Transformer Engine spec fuses these norms into the next linear.
INPUT_NORM = ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
PRE_MLP_NORM = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
VOCAB_PAD_MULTIPLE = 128  # Megatron rows: the vocabulary padded to a multiple of this (layout-independent)


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the tokenizer's, unpadded
    tie_embeddings: bool

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def _take(state: dict, key: str, shape: tuple, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{where}: missing tensor {key!r}; is this a checkpoint of this architecture and size?")
    value = state.pop(key)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)} from the config")
    return value


def _take_any(state: dict, keys: tuple[str, ...], shape: tuple, where: str) -> torch.Tensor:
    """One weight under any of its spec-dependent names (all copies present must agree)."""
    present = [k for k in keys if k in state]
    value = _take(state, present[0] if present else keys[0], shape, where)
    for other in present[1:]:
        if not torch.equal(state.pop(other), value):
            raise ValueError(f"{where}: {present[0]} and {other} name one weight but differ")
    return value


def _refuse_leftovers(state: dict, where: str) -> None:
    if state:
        names = sorted(state)
        raise ValueError(
            f"{where}: {len(names)} tensor(s) this converter does not know, e.g. {names[:5]}: "
            "a checkpoint of another architecture (SSA/Llama decoders only)"
        )


def megatron_to_hf(full: dict[str, torch.Tensor], s: Shape, *, where: str = "Megatron checkpoint") -> dict[str, torch.Tensor]:
    """Megatron full state -> HF SSA state. Vocabulary padding rows are dropped (see ``vocab_padding``)."""
    state = dict(full)
    h, d, hq, hkv, g = s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads, s.num_heads // s.num_kv_heads
    out = {}
    rows = state[EMBEDDING].shape[0] if EMBEDDING in state else s.padded_vocab_size
    if rows < s.vocab_size:
        raise ValueError(f"{where}: embedding has {rows} rows, fewer than the vocabulary ({s.vocab_size})")
    out["model.embed_tokens.weight"] = _take(state, EMBEDDING, (rows, h), where)[: s.vocab_size]
    for i in range(s.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = _take_any(state, tuple(p + k for k in INPUT_NORM), (h,), where)
        # [hkv * (g + 2) * d, h] -> [hkv, g + 2, d, h]: per group g query heads, then k, then v
        qkv = _take(state, p + "self_attention.linear_qkv.weight", (hkv * (g + 2) * d, h), where).view(hkv, g + 2, d, h)
        out[q + "self_attn.q_proj.weight"] = qkv[:, :g].reshape(hq * d, h).clone()
        out[q + "self_attn.k_proj.weight"] = qkv[:, g].reshape(hkv * d, h).clone()
        out[q + "self_attn.v_proj.weight"] = qkv[:, g + 1].reshape(hkv * d, h).clone()
        out[q + "self_attn.g_proj.weight"] = _take(state, p + "self_attention.linear_gate.weight", (hq, h), where)
        out[q + "self_attn.o_proj.weight"] = _take(state, p + "self_attention.linear_proj.weight", (h, hq * d), where)
        out[q + "post_attention_layernorm.weight"] = _take_any(state, tuple(p + k for k in PRE_MLP_NORM), (h,), where)
        gate, up = _take(state, p + "mlp.linear_fc1.weight", (2 * s.ffn_hidden_size, h), where).chunk(2, dim=0)
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[q + "mlp.down_proj.weight"] = _take(state, p + "mlp.linear_fc2.weight", (h, s.ffn_hidden_size), where)
    out["model.norm.weight"] = _take(state, FINAL_NORM, (h,), where)
    if s.tie_embeddings:
        state.pop(OUTPUT, None)  # a tied copy, if present
    else:
        out["lm_head.weight"] = _take(state, OUTPUT, (rows, h), where)[: s.vocab_size]
    _refuse_leftovers(state, where)
    return out


def vocab_padding(full: dict[str, torch.Tensor], s: Shape) -> dict[str, torch.Tensor]:
    """Megatron's rows past the vocabulary: kept beside an export so the way back is exact
    (they join Megatron's softmax; the HF model has no use for them)."""
    pad = {}
    for key, name in ((EMBEDDING, "embedding_padding"), (OUTPUT, "output_padding")):
        if key in full and full[key].shape[0] > s.vocab_size and (key == EMBEDDING or not s.tie_embeddings):
            pad[name] = full[key][s.vocab_size :].contiguous()
    return pad


def hf_to_megatron(
    hf: dict[str, torch.Tensor],
    s: Shape,
    *,
    gate: str = "ssa",
    padding: dict[str, torch.Tensor] | None = None,
    where: str = "HF checkpoint",
) -> dict[str, torch.Tensor]:
    """HF state -> Megatron full state (local-spec names, plus the TE-spec alias of the pre-MLP norm).

    ``gate``: ``"ssa"`` (``g_proj [hq, h]``: ours), ``"authors"`` (``g_proj [3 * hq, h]``, viewed
    ``[hq, 3, h]``: the middle entry per head is the SSA gate, the others belong to NSA's compressed
    and sliding-window branches) or ``"neutral"`` (plain Llama: no ``g_proj``; the gate weights are 0,
    so every head is scaled by sigmoid(0) = 1/2, and ``o_proj`` is doubled: the layer computes exactly
    what the Llama layer did, in any dtype, while the gate still receives gradient).
    Padding rows come from ``padding`` (an export's) when they fit, zeros otherwise.
    """
    state = dict(hf)
    h, d, hq, hkv, g = s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads, s.num_heads // s.num_kv_heads
    rows = s.padded_vocab_size
    padding = padding or {}

    def padded(value: torch.Tensor, name: str) -> torch.Tensor:
        extra = padding.get(name)
        if extra is None or tuple(extra.shape) != (rows - s.vocab_size, h):
            extra = value.new_zeros(rows - s.vocab_size, h)
        return torch.cat([value, extra.to(value.dtype)]) if rows > s.vocab_size else value

    out = {}
    embedding = _take(state, "model.embed_tokens.weight", (s.vocab_size, h), where)
    out[EMBEDDING] = padded(embedding, "embedding_padding")
    for i in range(s.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + INPUT_NORM[0]] = _take(state, q + "input_layernorm.weight", (h,), where)
        wq = _take(state, q + "self_attn.q_proj.weight", (hq * d, h), where).view(hkv, g, d, h)
        wk = _take(state, q + "self_attn.k_proj.weight", (hkv * d, h), where).view(hkv, 1, d, h)
        wv = _take(state, q + "self_attn.v_proj.weight", (hkv * d, h), where).view(hkv, 1, d, h)
        out[p + "self_attention.linear_qkv.weight"] = torch.cat([wq, wk, wv], dim=1).reshape(hkv * (g + 2) * d, h)
        o_proj = _take(state, q + "self_attn.o_proj.weight", (h, hq * d), where)
        if gate == "ssa":
            out[p + "self_attention.linear_gate.weight"] = _take(state, q + "self_attn.g_proj.weight", (hq, h), where)
        elif gate == "authors":
            three = _take(state, q + "self_attn.g_proj.weight", (3 * hq, h), where)
            out[p + "self_attention.linear_gate.weight"] = three.view(hq, 3, h)[:, 1].clone()
        elif gate == "neutral":
            out[p + "self_attention.linear_gate.weight"] = o_proj.new_zeros(hq, h)
            o_proj = o_proj * 2  # exact: a power of two
        else:
            raise ValueError(f"gate={gate!r}: must be ssa, authors or neutral")
        out[p + "self_attention.linear_proj.weight"] = o_proj
        out[p + PRE_MLP_NORM[0]] = _take(state, q + "post_attention_layernorm.weight", (h,), where)
        out[p + PRE_MLP_NORM[1]] = out[p + PRE_MLP_NORM[0]]  # the TE spec's name for the same weight
        gate_w = _take(state, q + "mlp.gate_proj.weight", (s.ffn_hidden_size, h), where)
        up_w = _take(state, q + "mlp.up_proj.weight", (s.ffn_hidden_size, h), where)
        out[p + "mlp.linear_fc1.weight"] = torch.cat([gate_w, up_w])
        out[p + "mlp.linear_fc2.weight"] = _take(state, q + "mlp.down_proj.weight", (h, s.ffn_hidden_size), where)
    out[FINAL_NORM] = _take(state, "model.norm.weight", (h,), where)
    lm_head = state.pop("lm_head.weight", None)
    if not s.tie_embeddings:
        if lm_head is None:
            raise ValueError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
        if tuple(lm_head.shape) != (s.vocab_size, h):
            raise ValueError(f"{where}: lm_head.weight has shape {tuple(lm_head.shape)}, expected {(s.vocab_size, h)}")
        out[OUTPUT] = padded(lm_head, "output_padding")
    elif lm_head is not None and not torch.equal(lm_head, embedding):
        raise ValueError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
    for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        state.pop(key)  # a buffer some old Llama checkpoints saved: recomputed from rope_theta
    _refuse_leftovers(state, where)
    return out
