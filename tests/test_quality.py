"""The quality table (bench/quality.py): Welch intervals against scipy's own, verdicts gated on
preconditions, and every adapter run on the committed benchmark results."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from .conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import quality  # noqa: E402

samples = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=8)


@given(a=samples, b=samples)
def test_welch_interval_is_scipys(a, b):
    from scipy import stats

    assume(statistics.variance(a) > 1e-9 and statistics.variance(b) > 1e-9)   # (scipy's own test is not robust below)
    lo, hi = quality.welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(quality.CONFIDENCE)
    assert math.isclose(lo, ref.low, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(hi, ref.high, rel_tol=1e-6, abs_tol=1e-9)


@given(a=samples, b=samples, holds=st.booleans())
def test_verdicts_are_gated_and_antisymmetric(a, b, holds):
    pre = quality.Precondition("p", "v", holds)
    forward = quality.verdict(quality.welch_interval(a, b), pre)
    backward = quality.verdict(quality.welch_interval(b, a), pre)
    if not holds:
        assert forward == backward == "not testable here"
    else:
        swap = {"held": "not held", "not held": "held", "inconclusive": "inconclusive"}
        assert backward == swap[forward]


@given(shift=st.floats(0.5, 5), noise=st.lists(st.floats(-0.01, 0.01), min_size=5, max_size=5))
def test_a_clear_gain_is_held_and_lower_is_better_flips_it(shift, noise):
    better = quality.row("m", "a", "acc", [shift + e for e in noise])
    worse = quality.row("m", "b", "acc", [-e for e in noise])
    pre = quality.Precondition("p", "v", True)
    assert quality.claim("a beats b", better, worse, pre)["verdict"] == "held"
    assert quality.claim("a has lower loss", better, worse, pre, higher_is_better=False)["verdict"] == "not held"


def test_no_precondition_measured_is_never_a_verdict():
    rows = [quality.row("m", v, "acc", [1.0, 2.0, 3.0]) for v in ("a", "b")]
    c = quality.claim("a beats b", rows[0], rows[1], quality.Precondition("p", "not measured", None))
    assert c["verdict"] == "not testable here" and c["held"] is None


@pytest.mark.parametrize("name", sorted(quality.ADAPTERS))
def test_every_adapter_reads_its_committed_results(name):
    files = quality.result_files(name)
    assert files and files[0] == name
    for file in files:
        _check_adapter(name, json.load(open(os.path.join(ROOT, "bench", "results", f"{file}.json"))))


def _check_adapter(name: str, results: dict) -> None:
    rows, claims = quality.ADAPTERS[name](results)
    assert rows and claims
    for c in claims:
        assert c["verdict"] in quality.VERDICTS
        assert c["precondition"]["text"] and c["precondition"]["value"]
    n = quality.counts(claims)
    assert n["claims"] == len(claims) == sum(n[v] for v in quality.VERDICTS)
