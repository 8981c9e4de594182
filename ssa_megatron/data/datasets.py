"""Train/valid/test GPT datasets from a blend of indexed prefixes, via megatron-core's builder.

``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` do the sampling: documents shuffled per
epoch with ``seed``, packed into ``seq_length + 1`` token windows, blended by weight, with
their index arrays cached under ``<cache_dir>/indices`` (shared by all ranks: rank 0 builds
them, then the others load; the cache must live on a filesystem every rank sees, like
Megatron-LM's ``--data-cache-path``). Every rank builds the datasets (``is_built_on_rank``
is always true) because every rank here feeds a model replica or a pipeline stage.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from ssa_megatron.data.config import DataConfig, parse_blend, parse_split
from ssa_megatron.data.indexed_format import bin_path, read_header, read_index

log = logging.getLogger(__name__)


def check_prefixes(prefixes: list[str], vocab_size: int) -> None:
    """Fail early, naming the file and the fix, on a missing, truncated or mismatched dataset."""
    for prefix in prefixes:
        try:
            index = read_index(prefix)  # header, .idx and .bin sizes: O(1), no data read
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.data_path: {e}") from None
        except ValueError as e:
            raise ValueError(f"data.data_path: {e}") from None
        if index.dtype.itemsize == 2 and vocab_size > 1 << 16:
            raise ValueError(f"data.data_path: {prefix} stores uint16 tokens but the tokenizer has "
                             f"{vocab_size} ids; it was preprocessed with another tokenizer, set "
                             "data.tokenizer to that one or re-run preprocessing")
        _check_token_ids(prefix, index, vocab_size)


# Tokens read per prefix for the id check: enough to meet any id of a different tokenizer, O(1) I/O.
_ID_CHECK_TOKENS = 1 << 20


def _check_token_ids(prefix: str, index, vocab_size: int) -> None:
    """An id >= the tokenizer's vocabulary means the data was tokenised with another tokenizer."""
    count = min(index.num_tokens, _ID_CHECK_TOKENS)
    if count == 0:
        return
    head = np.memmap(bin_path(prefix), dtype=index.dtype, mode="r", shape=(count,))
    largest = int(head.max())
    if largest >= vocab_size:
        raise ValueError(f"data.data_path: {bin_path(prefix)} holds token id {largest} but the tokenizer "
                         f"(data.tokenizer) has {vocab_size} ids: the data was preprocessed with another "
                         "tokenizer; set data.tokenizer to that one or re-run preprocessing")


SPLIT_NAMES = ("train", "validation", "test")


def check_splits(prefixes: list[str], split: str) -> None:
    """Refuse a split with a weight but no documents of some prefix, before Megatron's builder.

    Megatron cuts each prefix's documents at ``round(fraction x documents)`` (the same arithmetic
    is used here); a split that gets zero documents makes ``GPTDataset`` loop forever looking for
    tokens, even when that split needs no samples. A split with weight 0 is not built at all.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    parse_split(split)  # our message for a malformed split
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        try:
            documents = read_header(prefix).sequence_count
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.data_path: {e}") from None
        except ValueError as e:
            raise ValueError(f"data.data_path: {e}") from None
        for name, bookends in zip(SPLIT_NAMES, matrix):
            if bookends is None:
                continue
            count = int(round(bookends[1] * float(documents))) - int(round(bookends[0] * float(documents)))
            if count > 0:
                continue
            fix = ("give it no weight (e.g. data.split: '100,0,0' with train.eval_interval: 0)"
                   if name != "train" else "give the train split most of the weight (e.g. '98,2,0')")
            raise ValueError(
                f"data.split={split!r}: the {name} split gets 0 of the {documents} document(s) of {prefix} "
                f"(Megatron splits each dataset by document): preprocess more documents (e.g. "
                f"--text-separator cuts a text file into documents) or {fix}")


@contextlib.contextmanager
def _process_group_for_megatron():
    """megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` without
    checking initialisation (fixed in 0.17+); outside a distributed run, give it a private
    one-rank gloo group for the duration of the build."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_datasets(config: DataConfig, *, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                   tokenizer) -> tuple:
    """(train, valid, test) Megatron datasets, None for a split with zero weight.

    ``num_samples`` is the number of ``seq_length`` samples each split must provide
    (Megatron repeats epochs to reach it). Call on every rank, with or without
    ``torch.distributed`` initialised.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if config.data_path is None:
        raise ValueError("data.data_path is None: call prepare_default_corpus() first, or set "
                         "data.data_path and data.tokenizer")
    if seq_length < 1 or len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"build_datasets: seq_length={seq_length} must be >= 1 and num_samples={num_samples} "
                         "three non-negative counts (train, valid, test)")
    prefixes, weights = parse_blend(config.data_path)
    check_prefixes(prefixes, tokenizer.vocab_size)
    check_splits(prefixes, config.split)
    gpt_config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=config.split,
        path_to_cache=os.path.join(os.path.abspath(config.cache_dir), "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # SSA / flash kernels build the causal mask themselves
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, gpt_config)
    with _process_group_for_megatron():
        train, valid, test = builder.build()
    log.info("datasets: train %s, valid %s, test %s samples of %d tokens",
             *(len(d) if d is not None else None for d in (train, valid, test)), seq_length)
    return train, valid, test
