"""Hypothesis profiles for the whole test run, chosen by the HYPOTHESIS_PROFILE environment variable.

- ``dev`` (default): quick local runs, random seeds.
- ``ci``: derandomized, so a CI failure reproduces exactly; the profile .ci/run uses.
- ``thorough``: many more examples, for deeper local runs before a release.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
