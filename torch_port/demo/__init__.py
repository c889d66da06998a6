"""The training demo: train a small network with each loss on real handwritten digits and show the geometry.

``python -m torch_port demo`` (or ``./run.sh demo``, or the ``softmax-variants demo`` script) trains
a small multilayer perceptron on the 1,797 8x8 digit images that ship with scikit-learn (no
download), or on MNIST IDX files given with ``--data``, to a 2-D (or 3-D) embedding, once per loss,
and writes into ``--out``: one figure per loss (held-out features coloured by class, and their
directions on the unit circle), a grid of all of them, and a table (Markdown and CSV) of held-out
accuracy, mean intra-class angle, minimum angle between class centres and training time, and the
open set: each loss also trained without some classes, whose images are then verified pair by pair
(ROC AUC, TAR at FAR = 1e-2, equal error rate; ``roc.png``, ``openset.csv``).

The losses are the package's own heads; which ones the demo trains, and with what settings, is the
one table in :mod:`~torch_port.demo.settings` (:data:`DEMO_LOSSES`, with :data:`DEMO_SETTINGS` its
view name -> settings). One module per concern: ``settings``, ``data``, ``heads``, ``model``,
``metrics``, ``verification`` (ROC, AUC, TAR at a FAR, EER of pair scores), ``openset`` (the
rotations of held-out classes), ``training``, ``seeds`` (``--seeds`` and the mean and range over
seeds), ``figures``, ``report``, ``run`` (:func:`run_demo`) and ``cli``.

With ``--seeds`` (e.g. ``0-4``) each seed is a whole run and the table gives, per loss and metric,
the mean and range over the seeds: a single run's numbers are repeatable on one machine but vary
with the CPU's kernels, and what holds across seeds is what holds on any machine.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm): ``pip install 'softmax-variants[demo]'``.
Importing this package loads none of them; a run imports them when it starts.
"""

from torch_port.demo.cli import add_arguments, run_from_args
from torch_port.demo.data import DemoData, load_digits, load_mnist_idx, read_idx
from torch_port.demo.extras import require
from torch_port.demo.figures import grid_figure, loss_figure, roc_figure, save_grid, save_loss_figure, save_roc_figure
from torch_port.demo.heads import SoftmaxCenterHead, SoftmaxHead
from torch_port.demo.metrics import Geometry, angle_degrees, class_geometry, unit_vectors
from torch_port.demo.model import EmbeddingNet
from torch_port.demo.openset import OPEN_METRICS, OpenSetResult, OpenSetSplit, open_set_split, rotation_groups
from torch_port.demo.report import (
    OPEN_SET_COLUMNS,
    RUN_COLUMNS,
    SUMMARY_COLUMNS,
    TABLE_COLUMNS,
    markdown_table,
    summary_markdown_table,
    training_note,
    write_csv,
    write_open_set_csv,
    write_runs_csv,
    write_summary_csv,
)
from torch_port.demo.run import DemoRun, run_demo
from torch_port.demo.seeds import LossSummary, Spread, check_seeds, format_seeds, parse_seeds, summarize
from torch_port.demo.settings import (
    BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEMO_LOSSES,
    DEMO_SETTINGS,
    HEAD_BUILDERS,
    HELD_OUT_FRACTION,
    HIDDEN_SIZES,
    LEARNING_RATE,
    LOSS_TITLES,
    LOSSES,
    NUM_THREADS,
    WEIGHT_DECAY,
    DemoLoss,
    build_head,
    describe_settings,
)
from torch_port.demo.training import LossResult, train_one
from torch_port.demo.verification import (
    FAR_TARGET,
    Verification,
    equal_error_rate,
    pair_scores,
    roc_auc,
    roc_curve,
    tar_at_far,
    verify,
)

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEMO_LOSSES",
    "DEMO_SETTINGS",
    "FAR_TARGET",
    "HEAD_BUILDERS",
    "HELD_OUT_FRACTION",
    "HIDDEN_SIZES",
    "LEARNING_RATE",
    "LOSSES",
    "LOSS_TITLES",
    "NUM_THREADS",
    "OPEN_METRICS",
    "OPEN_SET_COLUMNS",
    "RUN_COLUMNS",
    "SUMMARY_COLUMNS",
    "TABLE_COLUMNS",
    "WEIGHT_DECAY",
    "DemoData",
    "DemoLoss",
    "DemoRun",
    "EmbeddingNet",
    "Geometry",
    "LossResult",
    "LossSummary",
    "OpenSetResult",
    "OpenSetSplit",
    "SoftmaxCenterHead",
    "SoftmaxHead",
    "Spread",
    "Verification",
    "add_arguments",
    "angle_degrees",
    "build_head",
    "check_seeds",
    "class_geometry",
    "describe_settings",
    "equal_error_rate",
    "format_seeds",
    "grid_figure",
    "load_digits",
    "load_mnist_idx",
    "loss_figure",
    "markdown_table",
    "open_set_split",
    "pair_scores",
    "parse_seeds",
    "read_idx",
    "require",
    "roc_auc",
    "roc_curve",
    "roc_figure",
    "rotation_groups",
    "run_demo",
    "run_from_args",
    "save_grid",
    "save_loss_figure",
    "save_roc_figure",
    "summarize",
    "summary_markdown_table",
    "tar_at_far",
    "train_one",
    "training_note",
    "unit_vectors",
    "verify",
    "write_csv",
    "write_open_set_csv",
    "write_runs_csv",
    "write_summary_csv",
]
