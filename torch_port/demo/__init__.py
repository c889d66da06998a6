"""The training demo: train a small network with each loss on real handwritten digits and show the geometry.

``python -m torch_port demo`` (or ``./run.sh demo``, or the ``softmax-variants demo`` script) trains
a small multilayer perceptron on the 1,797 8x8 digit images that ship with scikit-learn (no
download), or on MNIST IDX files given with ``--data``, to a 2-D (or 3-D) embedding, once per loss,
and writes into ``--out``: one figure per loss (held-out features coloured by class, and their
directions on the unit circle), a grid of all of them, and a table (Markdown and CSV) of held-out
accuracy, mean intra-class angle, minimum angle between class centres and training time.

The losses are the package's own heads; which ones the demo trains, and with what settings, is the
one table in :mod:`~torch_port.demo.settings` (:data:`DEMO_LOSSES`, with :data:`DEMO_SETTINGS` its
view name -> settings). One module per concern: ``settings``, ``data``, ``heads``, ``model``,
``metrics``, ``training``, ``figures``, ``report``, ``run`` (:func:`run_demo`) and ``cli``.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm): ``pip install 'softmax-variants[demo]'``.
Importing this package loads none of them; a run imports them when it starts.
"""

from torch_port.demo.cli import add_arguments, run_from_args
from torch_port.demo.data import DemoData, load_digits, load_mnist_idx, read_idx
from torch_port.demo.extras import require
from torch_port.demo.figures import save_grid, save_loss_figure
from torch_port.demo.heads import SoftmaxCenterHead, SoftmaxHead
from torch_port.demo.metrics import Geometry, angle_degrees, class_geometry, unit_vectors
from torch_port.demo.model import EmbeddingNet
from torch_port.demo.report import TABLE_COLUMNS, markdown_table, training_note, write_csv
from torch_port.demo.run import DemoRun, run_demo
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

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEMO_LOSSES",
    "DEMO_SETTINGS",
    "HEAD_BUILDERS",
    "HELD_OUT_FRACTION",
    "HIDDEN_SIZES",
    "LEARNING_RATE",
    "LOSSES",
    "LOSS_TITLES",
    "NUM_THREADS",
    "TABLE_COLUMNS",
    "WEIGHT_DECAY",
    "DemoData",
    "DemoLoss",
    "DemoRun",
    "EmbeddingNet",
    "Geometry",
    "LossResult",
    "SoftmaxCenterHead",
    "SoftmaxHead",
    "add_arguments",
    "angle_degrees",
    "build_head",
    "class_geometry",
    "describe_settings",
    "load_digits",
    "load_mnist_idx",
    "markdown_table",
    "read_idx",
    "require",
    "run_demo",
    "run_from_args",
    "save_grid",
    "save_loss_figure",
    "train_one",
    "training_note",
    "unit_vectors",
    "write_csv",
]
