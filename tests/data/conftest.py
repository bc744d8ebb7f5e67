"""Hypothesis's profiles for the property tests (test_data_fuzz.py): few examples while developing,
the full count in CI (.ci/run sets NXTP_HYPOTHESIS_PROFILE=ci)."""

import os

from hypothesis import settings

settings.register_profile("dev", max_examples=20, deadline=None, database=None)
settings.register_profile("ci", max_examples=120, deadline=None, database=None)
settings.load_profile(os.environ.get("NXTP_HYPOTHESIS_PROFILE", "dev"))
