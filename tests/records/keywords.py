"""The keywords every margin loss takes on top of its hyperparameters, drawn inside a record's samples.

- ``margin_grad="detached"`` (sometimes): the margin's value with the un-margined logit's gradient;
- labels of ignored rows (some rows, occasionally all of them): ``ignore_index`` -1 (the default,
  not passed) or another negative label passed as ``ignore_index``;
- per-sample margins are drawn by the families whose margins take them (tests/records/normalized.py).

Drawn inside the records' existing samples, so the shared suites run them on every path without
more examples. A detached sample's gradient is not the derivative of its value, so the suites'
central differences skip it (:func:`has_detached_margin`); tests/test_modern_margins.py checks the
detached gradient by an independent route.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@st.composite
def margin_keywords(draw, y: np.ndarray, detachable: bool = True):
    """(labels, keywords): ``y`` with ignored rows marked, and the keywords to pass.

    Shrinks to no keyword at all. About one sample in three is detached; about four in nine have
    ignored rows drawn (a quarter of them every row; the rest a drawn mask, possibly empty)."""
    kwargs = {}
    if detachable and draw(st.sampled_from(range(3)), label="detached") == 2:
        kwargs["margin_grad"] = "detached"
    mode = draw(st.sampled_from(range(9)), label="ignored rows")
    if mode >= 5:
        ignored = np.ones(len(y), dtype=bool) if mode == 8 else draw(hnp.arrays(np.bool_, (len(y),)))
        label = draw(st.sampled_from((-1, -3)), label="ignore_index")
        if label != -1:
            kwargs["ignore_index"] = label
        y = np.where(ignored, label, y).astype(np.int64)
    return y, kwargs


def has_detached_margin(kwargs: dict) -> bool:
    return kwargs.get("margin_grad") == "detached"
