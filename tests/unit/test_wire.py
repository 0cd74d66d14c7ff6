"""The expert call's wire (engine/wire.py): bytes both ways, exact round trips, in-place reads, clear errors."""

import pytest
import torch

from moeray.engine.wire import decode_answer, decode_call, encode_answer, encode_call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_call_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g).to(dtype)
    pair_rows = torch.tensor([0, 1, 1, 4, 2, 3])
    expert_ids = torch.tensor([3, 0, 7, 7, 2, 15])
    weights = torch.rand(6, generator=g)
    rows, meta = encode_call(x, pair_rows, expert_ids, weights)
    assert isinstance(rows, bytes) and isinstance(meta, bytes)
    assert len(rows) == x.numel() * x.element_size()  # the rows travel raw, nothing else in that buffer
    xr, pr, ei, w = decode_call(rows, meta)
    assert xr.dtype is dtype and xr.shape == (5, 8)
    assert torch.equal(xr.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       x.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert pr.dtype is torch.int64 and torch.equal(pr, pair_rows)
    assert ei.dtype is torch.int64 and torch.equal(ei, expert_ids)
    assert w.dtype is torch.float32 and torch.equal(w, weights)


def test_decoded_rows_are_read_in_place():
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    rows, meta = encode_call(x, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]), torch.ones(3))
    xr = decode_call(rows, meta)[0]
    # the tensor's memory is the bytes object's: no copy on the receiving side
    assert xr.data_ptr() == torch.frombuffer(rows, dtype=torch.uint8).data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_answer_round_trip_is_bit_exact_and_in_place(dtype):
    out = torch.randn(7, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    buf = encode_answer(out)
    back = decode_answer(buf)
    assert back.dtype is dtype and torch.equal(back.float(), out.float())
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert back.data_ptr() - base == 16  # after the 16-byte header: aligned, not copied


def test_empty_call_and_answer():
    x = torch.empty(0, 8)
    rows, meta = encode_call(x, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0))
    xr, pr, ei, w = decode_call(rows, meta)
    assert xr.shape == (0, 8) and pr.numel() == ei.numel() == w.numel() == 0
    assert decode_answer(encode_answer(torch.empty(0, 8))).shape == (0, 8)


def test_bad_buffers_name_what_disagrees():
    x = torch.randn(2, 4)
    rows, meta = encode_call(x, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.ones(2))
    with pytest.raises(ValueError, match="header says"):
        decode_call(rows[:-4], meta)
    with pytest.raises(ValueError, match="header says"):
        decode_call(rows, meta[:-4])
    with pytest.raises(ValueError, match="wire dtype"):
        encode_answer(torch.zeros(1, 2, dtype=torch.float64))
