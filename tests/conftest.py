"""Hypothesis profiles for the property tests; pick one with HYPOTHESIS_PROFILE (default `ci`).

- `ci`: 25 examples per test, derandomized so every run (and every CI machine) draws the same
  graphs; no example database, so nothing is written into the working tree.
- `long`: 2000 examples per test, freshly random each run, for a soak by hand
  (`python bench/properties_long.py`). A failure prints a `@reproduce_failure` blob.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings

# Caches (measured quantization timings) go to a folder of this test session, never the user's.
os.environ["IROPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="iropt-test-cache-")

_COMMON = {
    "deadline": None,  # ONNX Runtime sessions make timing noisy; no test asserts on time
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=2000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
