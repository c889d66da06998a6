"""benchmarks/sharded_scale.py runs, and its traffic count is the method's (issue 17).

The script is a measurement, not a test; here its smallest setting runs on 2 gloo ranks and the
numbers it reports are checked for what does not depend on the machine: each rank hands the
collectives the payload the method needs (its rows of x, the (B, D) feature gradient, a few (B,)
vectors, the int64 labels and the metadata summary), independent of the number of classes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.distributed_harness import REPO, worker_environment


def test_the_scale_script_runs_and_sends_what_the_method_needs(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sharded_scale.py"), "--quick", "--no-single", "--json", str(out)],
        cwd=REPO,
        env=worker_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    batch, dim, world = result["args"]["batch"], result["args"]["dim"], result["args"]["world"]
    assert result["needed_bytes"] == 4 * (batch // world * dim + batch * dim + 4 * batch)
    for rank in result["ranks"]:
        labels = 8 * (batch // world)  # the int64 labels' all-gather
        summary = 3 * 8  # the agreement's (batch, digest, failed)
        assert rank["traffic_bytes"] == result["needed_bytes"] + labels + summary, rank
        assert rank["step_s"] > 0 and math.isfinite(rank["work_share"])
