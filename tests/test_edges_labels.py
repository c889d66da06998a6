"""Labels of every integer dtype, and labels on another device (issue 13, item 14).

Every function of the registry that takes labels accepts them in any integer dtype: uint16, uint32
and uint64 (for which PyTorch has no min/max) give the same bits as int64 labels, and an
out-of-range unsigned label is reported as the number it is (2**64 - 1, not -1). Labels on another
device than the features, the meta device included, get the device error, raised before any value
is read (a meta tensor has none to read). The heads inherit both, and change no state on refusal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.records.angular import HEADS as ANGULAR_HEADS
from tests.records.normalized import HEADS as NORMALIZED_HEADS
from tests.registry import RECORDS
from torch_port import CenterLoss
from torch_port.distributed.agreement import check_local
from torch_port.normalized import arcface_config
from torch_port.tensor_checks import check_labels

UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)
WITH_LABELS = [record for record in RECORDS if any("y" in sample.labels for sample in record.edge_cases())]


def _labelled_sample(record):
    return next(sample for sample in record.edge_cases() if "y" in sample.labels)


def _call(record, sample, y, **extra):
    tensors = sample.torch_tensors("float64")
    args = sample.torch_args(tensors, **extra)
    args["y"] = y
    return record.port(**args), tensors


def test_every_loss_that_takes_labels_is_covered():
    names = {record.name for record in WITH_LABELS}
    assert {"cross_entropy", "distillation_loss", "center_loss", "center_update", "normface_logits"} <= names
    assert {"lsoftmax_loss", "sphereface_loss", "arcface_loss", "combined_margin_loss", "cosface_logits"} <= names


@pytest.mark.parametrize("dtype", UNSIGNED, ids=str)
@pytest.mark.parametrize("record", WITH_LABELS, ids=str)
def test_unsigned_labels_give_the_bits_of_int64_labels(record, dtype):
    sample = _labelled_sample(record)
    labels = np.asarray(sample.labels["y"])
    expected, _ = _call(record, sample, torch.tensor(labels, dtype=torch.int64))
    got, _ = _call(record, sample, torch.tensor(labels, dtype=torch.int64).to(dtype))
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    # the reference takes NumPy's unsigned labels too: an independent route for the value
    reference = np.asarray(record.reference(**sample.numpy_args(y=labels.astype(np.uint64))))
    assert np.allclose(got.detach().numpy(), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("record", [r for r in WITH_LABELS if "chunked-k1" in r.paths], ids=str)
def test_unsigned_labels_reach_the_chunked_path_as_int64(record):
    sample = _labelled_sample(record)
    labels = torch.tensor(np.asarray(sample.labels["y"]), dtype=torch.int64)
    expected, _ = _call(record, sample, labels, chunk_size=1)
    got, _ = _call(record, sample, labels.to(torch.uint32), chunk_size=1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("dtype", "bad"), [(torch.uint8, 255), (torch.uint16, 65535), (torch.uint32, 2**32 - 1), (torch.uint64, 2**64 - 1)]
)
@pytest.mark.parametrize("record", WITH_LABELS, ids=str)
def test_an_out_of_range_unsigned_label_is_reported_as_itself(record, dtype, bad):
    sample = _labelled_sample(record)
    labels = np.asarray(sample.labels["y"]).astype(object)
    labels[0] = bad  # far above any C of the edge cases
    y = torch.tensor([int(v) for v in labels], dtype=torch.int64) if dtype != torch.uint64 else None
    if y is None:  # 2**64 - 1 does not fit in int64: build the uint64 tensor from its bits
        y = torch.tensor(np.asarray(labels, dtype=np.uint64).view(np.int64)).view(torch.uint64)
    else:
        y = y.to(dtype)
    tensors = sample.torch_tensors("float64")
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(ValueError, match=rf"\by\b must lie in \[0, \d+\), got values in \[\d+, {bad}\]"):
        record.port(**{**sample.torch_args(tensors), "y": y})
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint32], ids=str)
@pytest.mark.parametrize("record", WITH_LABELS, ids=str)
def test_labels_on_the_meta_device_get_the_device_error(record, dtype):
    sample = _labelled_sample(record)
    y = torch.tensor(np.asarray(sample.labels["y"]), dtype=torch.int64).to(dtype).to("meta")
    with pytest.raises(ValueError, match=r"different devices \(.*\by: meta\)"):
        _call(record, sample, y)


def test_labels_on_meta_with_features_on_meta_say_so():
    with pytest.raises(ValueError, match=r"\by\b is on the meta device"):
        check_labels(torch.tensor([0, 1], device="meta"), 2, 3, same_device_as=("x", torch.ones(2, 3, device="meta")))


def test_the_sharded_paths_local_check_takes_unsigned_and_refuses_meta_labels():
    x, W = torch.randn(3, 4), torch.randn(3, 4)  # rank 0 of 2 holds classes [0, 3) of 5
    config = arcface_config(64.0, 0.5, False)
    _, _, y = check_local(x, W, torch.tensor([4, 0, 2], dtype=torch.uint64), config, 5, 0, 2)
    assert y.dtype == torch.int64 and y.tolist() == [4, 0, 2]
    with pytest.raises(ValueError, match=r"different devices \(x: cpu, y: meta\)"):
        check_local(x, W, torch.tensor([4, 0, 2], device="meta"), config, 5, 0, 2)


def _heads():
    heads = {name: cls(5, 3, dtype=torch.float64) for name, cls in {**NORMALIZED_HEADS, **ANGULAR_HEADS}.items()}
    heads["normface_learned"] = NORMALIZED_HEADS["normface"](5, 3, learn_scale=True, dtype=torch.float64)
    heads["center"] = CenterLoss(5, 3, dtype=torch.float64)
    return heads


@pytest.mark.parametrize("name", list(_heads()))
def test_heads_take_unsigned_labels_and_refuse_meta_labels_changing_nothing(name):
    torch.manual_seed(0)
    head, twin = _heads()[name], _heads()[name]
    with torch.no_grad():
        for p, q in zip(head.parameters(), twin.parameters()):
            q.copy_(p)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2])
    assert torch.equal(head(x, y.to(torch.uint64)), twin(x, y))  # same loss, and the same state after it
    before = {k: v.clone() for k, v in head.state_dict().items()}
    for bad in (y.to("meta"), torch.tensor([0, 4, 2, 5], dtype=torch.uint16)):
        with pytest.raises(ValueError, match=r"\by\b"):
            head(x, bad)
    after = head.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(after[k], v) for k, v in twin.state_dict().items())
