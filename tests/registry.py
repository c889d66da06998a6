"""The registry: every function of the family, once, with what the shared suites need.

Each family's records (its reference, its port, a Hypothesis strategy of valid inputs and
hyperparameters, edge cases, error inputs, tolerance overrides, skips with their reasons) live in
``tests/records/<family>.py``; this module lists them all. Adding a loss = adding one
``LossRecord`` to its family's ``RECORDS``. ``tests/test_shared_suites.py`` runs every suite over
every record: forward agreement, gradient agreement (three ways), reductions, stability (extreme
and degenerate inputs, half precision, autocast) and error inputs. A margin loss record also lists
the paths of tests/paths.py (chunked with k = 1, 3, > C; sharded over 2 gloo ranks) and carries its
engine configuration and head, so the forward, gradient and stability suites run it on every path,
and tests/test_chunked.py and tests/test_distributed.py take their losses from it.
"""

from __future__ import annotations

from tests.records import adaptive, angular, center, modern, normalized, softmax
from tests.samples import LossRecord

RECORDS: list[LossRecord] = [
    *softmax.RECORDS,  # softmax, log_softmax, naive_softmax, cross_entropy, distillation_loss
    *angular.RECORDS,  # cos_m_theta, lsoftmax_psi, lsoftmax_loss/_logits, sphereface_loss/_logits
    *center.RECORDS,  # center_loss, center_update
    *normalized.RECORDS,  # normface, cosface, am_softmax, arcface, combined_margin: each _loss and _logits
    *modern.RECORDS,  # subcenter_arcface_loss/_logits
    *adaptive.RECORDS,  # curricularface, adaface, magface: each _loss and _logits
]

BY_NAME = {record.name: record for record in RECORDS}
