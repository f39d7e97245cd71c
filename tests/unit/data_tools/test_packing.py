"""Sample boundaries for variable-length kernels: the ``cu_seq_lens_q/k`` and ``max_length_q/k`` that packed batches
carry in ``position_ids`` mode must be exactly the boundaries their position ids describe, for any number of rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from data_tools.loader import build_dataloader
from data_tools.loading.packing import collate_chunks, collate_packed, varlen_boundaries
from tests.unit.data_tools.test_loader import _samples, write_mmap, write_wds

VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _boundaries_by_hand(position_ids: torch.Tensor) -> tuple[list[int], int]:
    """Row by row, token by token: a sample starts where the position id is 0; offsets count over all rows."""
    starts = []
    b, t = position_ids.shape
    for r in range(b):
        starts += [r * t + i for i in range(t) if int(position_ids[r, i]) == 0]
    cu = starts + [b * t]
    return cu, max(e - s for s, e in zip(cu[:-1], cu[1:], strict=True))


def _assert_boundaries_match(batch: dict) -> None:
    pos = batch["position_ids"]
    cu, max_len = _boundaries_by_hand(pos)
    for side in ("q", "k"):
        got = batch[f"cu_seq_lens_{side}"]
        assert got.dtype == torch.int32 and got.tolist() == cu
        assert type(batch[f"max_length_{side}"]) is int and batch[f"max_length_{side}"] == max_len
    # and what transformers' own flash path would derive from the same ids flattened into one row
    (ref_cu, _), (ref_max, _) = prepare_fa_kwargs_from_position_ids(pos)
    assert torch.equal(batch["cu_seq_lens_q"], ref_cu) and batch["max_length_q"] == int(ref_max)


def test_two_packed_rows_give_flattened_boundaries():
    a, b, c = np.arange(10, 13), np.arange(20, 22), np.arange(30, 34)
    batch = collate_packed([[(a, None), (b, None)], [(c, None)]], seq_len=7, pad_id=0, attention="position_ids")
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    # row 0: samples of 3 and 2 tokens, a 2-token padding tail; row 1: 4 tokens, a 3-token tail
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 11, 14]
    assert batch["max_length_q"] == 4
    _assert_boundaries_match(batch)
    assert not set(VARLEN_KEYS) & set(collate_packed([[(c, None)]], 7, 0, attention="mask"))


def test_text_chunks_give_the_boundaries_of_their_document_resets():
    pos = np.array([[0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 0, 1, 2, 3]])
    batch = collate_chunks(np.arange(24).reshape(3, 8) + 10, pos, attention="position_ids")
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6, 8, 16, 17, 20, 24]
    assert batch["max_length_q"] == 8
    _assert_boundaries_match(batch)


def test_a_row_that_does_not_start_at_zero_is_refused():
    """Flattened, such a row's first tokens would join the previous row's last sample."""
    with pytest.raises(ValueError, match="start at 0 in every row"):
        varlen_boundaries(np.array([[0, 1, 2], [1, 0, 1]]))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("varlen")
    samples = _samples(120, seed=5)
    return {
        "mmap-sft": write_mmap(root / "sft", samples),
        "mmap-text": write_mmap(root / "text", samples, loss_mask=False),  # Megatron chunks (collate_chunks)
        "wds-sft": write_wds(root / "wds", samples, [70, 50]),
    }


@pytest.mark.parametrize("micro_batch_size", [1, 3])
@pytest.mark.parametrize("which", ["mmap-sft", "mmap-text", "wds-sft"])
def test_every_loader_batch_carries_its_boundaries(sources, which, micro_batch_size):
    loader = build_dataloader(sources[which], seq_len=96, micro_batch_size=micro_batch_size, attention="position_ids")
    n = 0
    for batch in loader:
        assert batch["input_ids"].shape[0] == micro_batch_size
        _assert_boundaries_match(batch)
        n += 1
    assert n >= 3


def test_padded_batches_round_their_length_up_to_the_multiple_within_seq_len():
    import numpy as np

    from data_tools.loading.packing import IGNORE_INDEX, collate_padded

    samples = [(np.arange(5) + 10, None), (np.arange(13) + 10, None)]
    assert collate_padded(samples, 0)["input_ids"].shape == (2, 13)
    batch = collate_padded(samples, 0, multiple=8, cap=32)
    assert batch["input_ids"].shape == (2, 16) and batch["num_real_tokens"] == 18
    assert (batch["labels"][:, 13:] == IGNORE_INDEX).all() and (batch["attention_mask"][:, 13:] == 0).all()
    assert collate_padded(samples, 0, multiple=8, cap=14)["input_ids"].shape == (2, 14)  # never past seq_len
