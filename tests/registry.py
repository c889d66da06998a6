"""The registry: every function of the family, once, with what the shared suites need.

Each family's records (its reference, its port, a Hypothesis strategy of valid inputs and
hyperparameters, edge cases, error inputs, tolerance overrides, skips with their reasons) live in
``tests/records/<family>.py``; this module lists them all. Adding a loss = adding one
``LossRecord`` to its family's ``RECORDS``. ``tests/test_shared_suites.py`` runs every suite over
every record: forward agreement, gradient agreement (three ways), reductions, stability (extreme
and degenerate inputs, half precision, autocast) and error inputs.
"""

from __future__ import annotations

from tests.records import softmax
from tests.samples import LossRecord

RECORDS: list[LossRecord] = [
    *softmax.RECORDS,  # softmax, log_softmax, naive_softmax, cross_entropy, distillation_loss
]

BY_NAME = {record.name: record for record in RECORDS}
