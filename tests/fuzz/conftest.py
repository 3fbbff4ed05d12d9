"""Hypothesis settings for the fuzz tests: reproducible, no per-example deadline."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

# How many requests the RPC fuzz tests send in all (split between them); CI's
# default is 10,000: about 65 s on 2 cores (6 s per 1,000 requests), besides the
# session's build and servers.
FUZZ_REQUESTS = int(os.environ.get("SIEVE_FUZZ_EXAMPLES", "10000"))

# derandomize: the examples are a function of the test alone, so CI runs the same
# ones every time and a failure reproduces; no example database either.
settings.register_profile(
    "sieve-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    # No shrinking: an example is a batch of concurrent requests, each shrink step
    # sends a batch again (minutes), and the assertion names the failing request.
    phases=(Phase.explicit, Phase.generate),
    report_multiple_bugs=False,
    suppress_health_check=(
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ),
)
FUZZ = settings.get_profile("sieve-fuzz")
