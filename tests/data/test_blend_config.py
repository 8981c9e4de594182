"""DataConfig and blend parsing: both blend forms, and an error naming field, value and fix."""

from __future__ import annotations

import dataclasses

import pytest

from ssa_megatron.data import DataConfig, parse_blend


def test_megatron_style_yaml_style_and_unweighted_blends_parse():
    assert parse_blend(["0.7", "/p/A", "0.3", "/p/B"]) == (["/p/A", "/p/B"], [0.7, 0.3])
    assert parse_blend([0.7, "/p/A", 3, "/p/B"]) == (["/p/A", "/p/B"], [0.7, 3.0])  # YAML numbers
    assert parse_blend([{"weight": 2, "prefix": "/p/A"}, {"weight": 1, "prefix": "/p/B"}]) == (
        ["/p/A", "/p/B"], [2.0, 1.0])
    assert parse_blend(["/p/A", "/p/B"]) == (["/p/A", "/p/B"], None)
    assert parse_blend(["/p/A"]) == (["/p/A"], None)


@pytest.mark.parametrize("blend,match", [
    (["0.7", "/p/A", "0,3", "/p/B"], r"weight '0,3' \(before prefix '/p/B'\) is not a positive number"),
    (["0.7", "/p/A", "/p/B"], "must alternate"),
    (["-1", "/p/A"], "weight '-1'"),
    (["0.5", "0.5"], "not a dataset prefix"),
    ([{"weight": 1, "path": "/p/A"}], "exactly the keys 'weight' and 'prefix'"),
    ("/p/A", "must be a non-empty list"),
    ([], "must be a non-empty list"),
    (["/p/A_text_document.bin"], "without .bin/.idx"),
])
def test_bad_blends_are_refused_with_the_fix(blend, match):
    with pytest.raises(ValueError, match=match):
        parse_blend(blend)


def test_data_config_checks_every_field_with_its_name():
    with pytest.raises(ValueError, match=r"data.split='98,2': needs three comma-separated"):
        DataConfig(split="98,2")
    with pytest.raises(ValueError, match="data.tokenizer is required"):
        DataConfig(data_path=["/p/A"])
    with pytest.raises(ValueError, match=r"data.num_workers=-1"):
        DataConfig(num_workers=-1)
    with pytest.raises(ValueError, match="alternatives"):
        DataConfig(data_path=["/p/A"], webdataset="/w/index.json", tokenizer="/t")
    with pytest.raises(ValueError, match=r"data.data_path: weight 'x'"):
        DataConfig(data_path=["x", "/p/A", "1", "/p/B"], tokenizer="/t")
    with pytest.raises(ValueError, match=r"'\{name\}'"):
        DataConfig(webdataset="/w/index.json", tokenizer="/t", webdataset_url_template="s3://b/")
    cfg = DataConfig()  # the embedded default corpus
    assert cfg.data_path is None and dataclasses.replace(cfg, data_path=["/p"], tokenizer="/t").data_path == ["/p"]
