"""tools/inspect_data.py: statistics, decoding document N back to text, and corrupt input."""

from __future__ import annotations

from data_helpers import run_tool

from ssa_megatron.data.inspect import dataset_stats
from ssa_megatron.data.preprocess import PreprocessConfig, run_preprocess


def test_inspect_prints_stats_and_decodes_documents_back_to_their_text(tmp_path, corpus_jsonl, documents,
                                                                        tokenizer_dir):
    prefix = run_preprocess(PreprocessConfig(inputs=(corpus_jsonl,), output_prefix=str(tmp_path / "c"),
                                             tokenizer=tokenizer_dir, progress=False)).outputs[0]
    stats = dataset_stats(prefix)
    out = run_tool("inspect_data", prefix, "--tokenizer", tokenizer_dir, "--sample", 7, "--max-chars", 0,
                   "--check-tokens").stdout
    assert f"{len(documents):,} documents, {stats['tokens']:,} tokens (uint16)" in out
    assert "document length (tokens): min" in out and f"{len(documents):,} EOD tokens" in out
    decoded = out.split("--- document 7: ")[1].split("---\n", 1)[1]
    assert decoded == documents[7] + "<|endoftext|>\n"
    (tmp_path / "c_text_document.bin").write_bytes(b"\x00" * 10)
    bad = run_tool("inspect_data", prefix, check=False)
    assert bad.returncode == 2 and "c_text_document.bin: 10 bytes" in bad.stderr
    out_of_range = run_tool("inspect_data", tmp_path / "nope", "--tokenizer", tokenizer_dir, check=False)
    assert out_of_range.returncode == 2 and "missing" in out_of_range.stderr
