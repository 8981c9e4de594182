"""Megatron <-> Hugging Face conversion: checkpoints trained at TP=2 and PP=2 -> HF logits equal the
Megatron model's (full, sparse, another top_k at load); round trips; the authors' and plain Llama
layouts; bad input; the export loading in a process where ssa_megatron cannot be imported."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from distributed.launch import launch_training
from safetensors.torch import load_file, save_file
from synthetic_data import in_memory_data
from tiny_config import tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ssa_megatron.convert import hf_io
from ssa_megatron.convert.from_hf import convert_from_hf, read_hf
from ssa_megatron.convert.to_hf import convert_to_hf, export_hf

# vocab 300 -> Megatron pads to 384 rows; a large init makes attention peaked (selection matters).
MODEL = {"vocab_size": 300, "init_method_std": 0.3}
TRAIN = {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 2}
LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2}, "pp2": {"pipeline_model_parallel_size": 2}}
# fp32 on CPU; the sparse stream's selection and gathers reorder float sums against Megatron's path
LOGIT_ATOL = {"full": 1e-5, "sparse": 1e-4}
OTHER_TOP_K = 3  # the run trains with top_k=2 (tiny_config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny SSA model trained 2 steps at TP=2 and at PP=2 (2 gloo processes each), checkpointed."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, parallel in LAYOUTS.items():
        save = root / name
        launch_training(2, root / f"{name}_run", parallel=parallel, model=MODEL, train=TRAIN, checkpoint={"save": str(save)})
        out[name] = save
    return out


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: convert_to_hf(path, root / name, dtype="fp32", max_shard_size="40KB") for name, path in checkpoints.items()}


def megatron_logits(full: dict, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of the one-process Megatron model holding ``full``: full, sparse, sparse at OTHER_TOP_K."""
    import dataclasses

    from ssa_megatron.train.full_state import load_full_state
    from ssa_megatron.train.trainer import Trainer

    trainer = Trainer(tiny_config(model=MODEL), in_memory_data(vocab_size=256))
    try:
        load_full_state(trainer.model, full)
        module = trainer.model[0].module
        module.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        out = {}
        with torch.no_grad():
            for name, mode in (("full", "full"), ("sparse", "sparse")):
                trainer.step_state.use_inference_mode(mode)
                out[name] = module(tokens, positions, None)[..., : MODEL["vocab_size"]]
            for layer in module.decoder.layers:
                core = layer.self_attention.core_attention
                core.ssa = dataclasses.replace(core.ssa, top_k=OTHER_TOP_K)
            out["sparse_other_top_k"] = module(tokens, positions, None)[..., : MODEL["vocab_size"]]
    finally:
        trainer.close()
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exported_model_logits_equal_the_megatron_models(layout, checkpoints, exports):
    from ssa_megatron.train.checkpoint import load_full_state_dict

    tokens = torch.randint(0, MODEL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    _, full = load_full_state_dict(checkpoints[layout])
    want = megatron_logits(full, tokens)
    assert (want["full"] - want["sparse"]).abs().max() > 1e-2  # the two modes really differ here
    assert (want["sparse"] - want["sparse_other_top_k"]).abs().max() > 1e-2
    model = AutoModelForCausalLM.from_pretrained(exports[layout], trust_remote_code=True).eval()
    other = AutoModelForCausalLM.from_pretrained(exports[layout], trust_remote_code=True,
                                                 attention_mode="sparse", top_k=OTHER_TOP_K).eval()
    assert model.config.attention_mode == "full" and other.config.top_k == OTHER_TOP_K
    with torch.no_grad():
        got = {"full": model(tokens).logits, "sparse": model(tokens, attention_mode="sparse").logits,
               "sparse_other_top_k": other(tokens).logits}
    for name, logits in got.items():
        diff = (logits - want[name]).abs().max().item()
        print(f"{layout} {name}: max |HF - Megatron| logit = {diff:.2e} (logits up to {want[name].abs().max():.1f})")
        assert diff < LOGIT_ATOL["full" if name == "full" else "sparse"], (layout, name, diff)


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}" if file.name == hf_io.PADDING_FILE else k: v for k, v in load_file(file).items()})
    return tensors


def test_hf_to_megatron_to_hf_is_byte_identical_and_continues_training_like_the_original(checkpoints, exports, tmp_path):
    ckpt = tmp_path / "from_hf"
    convert_from_hf(exports["tp2"], ckpt, tp=2, pp=1)
    again = convert_to_hf(ckpt, tmp_path / "again", dtype="fp32", max_shard_size="40KB")
    first, second = read_safetensors_dir(exports["tp2"]), read_safetensors_dir(again)
    assert set(first) == set(second) and any(hf_io.PADDING_FILE in k for k in first)
    for key, value in first.items():
        assert value.dtype == second[key].dtype and value.shape == second[key].shape
        assert value.view(torch.uint8).numpy().tobytes() == second[key].view(torch.uint8).numpy().tobytes(), key
    # Megatron -> HF -> Megatron: one more step from the converted checkpoint = from the original one
    train = {**TRAIN, "train_iters": 1}
    original = launch_training(1, tmp_path / "orig", model=MODEL, train=train,
                               checkpoint={"load": str(checkpoints["tp2"]), "finetune": True})[0]["records"]
    converted = launch_training(1, tmp_path / "conv", model=MODEL, train=train, checkpoint={"load": str(ckpt)})[0]["records"]
    print(f"lm loss from the original checkpoint {original[0]['lm']:.6f}, from the round trip {converted[0]['lm']:.6f}")
    assert converted[0]["lm"] == original[0]["lm"] and converted[0]["align"] == original[0]["align"]


# -- other HF layouts -----------------------------------------------------------------------------

LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5)


def random_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.tie_weights()
    return model


def test_plain_llama_imports_with_a_neutral_gate(tmp_path):
    llama = random_llama(1)
    llama.save_pretrained(tmp_path / "llama")
    ckpt = convert_from_hf(tmp_path / "llama", tmp_path / "ckpt", tp=2)  # through a Megatron checkpoint
    from ssa_megatron.train.checkpoint import load_full_state_dict

    cfg, full = load_full_state_dict(ckpt.parent)
    assert cfg.parallel.tensor_model_parallel_size == 2
    export_hf(cfg, full, tmp_path / "ssa", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ssa", trust_remote_code=True).eval()
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens).logits - llama(tokens).logits).abs().max().item()
    print(f"plain Llama -> SSA (neutral gate): max |logit difference| = {diff:.2e}")
    assert diff < 1e-5


def authors_checkpoint(path: Path, llama: LlamaForCausalLM, g_proj: list[torch.Tensor], window_size: int = 0) -> None:
    """A checkpoint in the layout of zen-E/SSA-1B (their configs/ssa-1b-init): Llama weights + g_proj [3 * heads, hidden]."""
    path.mkdir()
    state = {k: v.contiguous() for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    for i, weight in enumerate(g_proj):
        state[f"model.layers.{i}.self_attn.g_proj.weight"] = weight
    save_file(state, str(path / "model.safetensors"))
    config = {k: v for k, v in LLAMA.items()}
    config.update(architectures=["LlamaNSAForCausalLM"], model_type="llama-nsa", rope_theta=10000.0, head_dim=8,
                  hidden_act="silu", attention_bias=False, mlp_bias=False, rope_scaling=None,
                  block_size=4, block_counts=3, window_size=window_size,
                  auto_map={"AutoConfig": "configuration_llama_nsa.LlamaNSAConfig",
                            "AutoModelForCausalLM": "modeling_llama_nsa.LlamaNSAForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))


def test_authors_layout_imports_with_the_middle_gate_third(tmp_path):
    llama = random_llama(2)
    heads, hidden = LLAMA["num_attention_heads"], LLAMA["hidden_size"]
    g_proj = [torch.randn(3 * heads, hidden) for _ in range(LLAMA["num_hidden_layers"])]
    authors_checkpoint(tmp_path / "authors", llama, g_proj)
    cfg, full, layout = read_hf(tmp_path / "authors")
    assert layout == "authors" and (cfg.ssa.block_size, cfg.ssa.top_k) == (4, 3)
    export_hf(cfg, full, tmp_path / "ssa", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ssa", trust_remote_code=True).eval()

    # What their layout means (their modeling_llama_nsa.py): g_cmp, g_slc, g_swa = sigmoid(g_proj(x)).view(..., heads, 3)
    # and the attention output of every head is scaled by g_slc before o_proj. The oracle: HF's Llama with that gate.
    gates = {}
    for i, layer in enumerate(llama.model.layers):
        def capture(module, args, kwargs, i=i):
            x = kwargs["hidden_states"]
            gates[i] = torch.sigmoid(x @ g_proj[i].T).view(*x.shape[:-1], heads, 3)[..., 1]

        def gate(module, args, i=i):
            (o,) = args
            return ((o.view(*o.shape[:-1], heads, -1) * gates[i][..., None]).flatten(-2),)

        layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True)
        layer.self_attn.o_proj.register_forward_pre_hook(gate)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = llama(tokens).logits
        diff = (model(tokens).logits - want).abs().max().item()
    print(f"authors' layout -> SSA: max |logit difference| vs their gated attention = {diff:.2e}")
    assert diff < 1e-5


def test_nsa_sibling_imports_with_a_warning_about_its_dropped_branches(tmp_path, caplog):
    llama = random_llama(3)
    g_proj = [torch.randn(12, 32) for _ in range(2)]
    authors_checkpoint(tmp_path / "nsa", llama, g_proj, window_size=128)
    read_hf(tmp_path / "nsa")
    assert "window_size=128" in caplog.text and "dropped" in caplog.text


# -- bad input ------------------------------------------------------------------------------------


def copy_export(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_bad_inputs_are_refused_with_clear_errors(exports, tmp_path):
    export = exports["pp2"]
    # another architecture
    other = copy_export(export, tmp_path / "gpt2")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="other architectures cannot be converted"):
        read_hf(other)
    extra = copy_export(export, tmp_path / "extra")
    shard = sorted(extra.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, str(shard))
    index = json.loads((extra / hf_io.SAFE_INDEX).read_text())
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = shard.name
    (extra / hf_io.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="another architecture"):
        read_hf(extra)
    # a missing and a truncated shard
    missing = copy_export(export, tmp_path / "missing")
    victim = sorted(missing.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"{victim.name} is missing"):
        read_hf(missing)
    truncated = copy_export(export, tmp_path / "truncated")
    victim = sorted(truncated.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_hf(truncated)
    # a TP size that does not divide the KV heads (2)
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4"):
        read_hf(export, tp=4)
    # top_k / block_size out of range at load
    for field, value in (("top_k", 0), ("block_size", -1), ("attention_mode", "dense")):
        with pytest.raises(ValueError, match=field):
            AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, **{field: value})


def word_tokenizer(path: Path, size: int) -> Path:
    from tokenizers import Tokenizer, models

    path.mkdir()
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1", "bos_token": "w2"}))
    return path


def test_tokenizer_must_match_the_embedding(exports, tmp_path):
    good, bad = word_tokenizer(tmp_path / "good", 300), word_tokenizer(tmp_path / "bad", 257)
    cfg, full, _ = read_hf(exports["tp2"])
    export_hf(cfg, full, tmp_path / "with_tokenizer", tokenizer=good, dtype="fp32")
    config = json.loads((tmp_path / "with_tokenizer" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (1, 2)
    assert (tmp_path / "with_tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="has 257 tokens but the model's vocabulary"):
        export_hf(cfg, full, tmp_path / "mismatch", tokenizer=bad, dtype="fp32")
    big = copy_export(tmp_path / "with_tokenizer", tmp_path / "big_tokenizer")
    (big / "tokenizer.json").unlink()
    word_tokenizer(tmp_path / "big", 400)
    (tmp_path / "big" / "tokenizer.json").rename(big / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer has 400 tokens but the embedding only 300 rows"):
        read_hf(big)


# -- the export stands alone ----------------------------------------------------------------------

ALONE = textwrap.dedent("""
    import json, sys
    sys.path[:] = [p for p in sys.path if "site-packages" not in p] + json.loads(sys.argv[2])
    for name in ("ssa_megatron", "ssa_kernels"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(name + " is importable: the test would prove nothing")
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokens = torch.tensor(json.loads(sys.argv[3]))
    out = {}
    with torch.no_grad():
        for mode in ("full", "sparse"):
            out[mode] = model(tokens, attention_mode=mode).logits.tolist()
            out[mode + "_generate"] = model.generate(tokens, max_new_tokens=8, do_sample=False, attention_mode=mode).tolist()
    print(json.dumps(out))
""")


def test_export_loads_and_generates_where_ssa_megatron_is_not_importable(exports, tmp_path):
    export = exports["tp2"]
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    # -I: no PYTHONPATH, user site or script dir; -S: no site-packages .pth files (the editable install's finder)
    env = {"PATH": os.environ.get("PATH", ""), "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ALONE, str(export), json.dumps(site.getsitepackages()), json.dumps(tokens.tolist())],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads(result.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    with torch.no_grad():
        for mode in ("full", "sparse"):
            torch.testing.assert_close(torch.tensor(alone[mode]), model(tokens, attention_mode=mode).logits, rtol=0, atol=1e-6)
            generated = model.generate(tokens, max_new_tokens=8, do_sample=False, attention_mode=mode)
            assert torch.equal(torch.tensor(alone[mode + "_generate"]), generated)


def test_on_a_machine_with_a_gpu_checkpoints_load_and_save_in_a_cpu_only_child(checkpoints, tmp_path, monkeypatch):
    """Where a GPU is visible, the CPU model must not patch torch.cuda in the caller's process (it runs
    on the GPU next): loading and saving happen in a spawned child that sees no GPU. This machine has
    no GPU, so the caller is told it has one; the child, a fresh interpreter, sees the truth."""
    from ssa_megatron.train import checkpoint as checkpoint_module

    _, here = checkpoint_module.load_full_state_dict(checkpoints["tp2"])
    children = []
    spawn = checkpoint_module._in_a_cpu_process
    monkeypatch.setattr(checkpoint_module, "_in_a_cpu_process", lambda fn, *a: children.append(fn) or spawn(fn, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg, there = checkpoint_module.load_full_state_dict(checkpoints["tp2"])
    assert children and cfg.model.vocab_size == MODEL["vocab_size"]
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)
    saved = checkpoint_module.save_model_checkpoint(cfg, there, tmp_path / "resaved")
    assert saved.is_dir() and len(children) == 2
    with pytest.raises(checkpoint_module.CheckpointError, match="no latest_checkpointed_iteration"):
        checkpoint_module.load_full_state_dict(tmp_path / "nothing_here")  # the child's error, raised here
