"""The coverage matrix: every zoo family (tests/zoo.py) × every method with its default options,
each case a clear one-line refusal or the whole adapter contract (tests/coverage_cases.py).  A few
families of each kind run on every stop; the whole matrix (``-m slow``) is what docs/coverage.md
shows (scripts/gen_coverage.py).  Known bugs are strict xfails, listed in coverage_cases.XFAIL.
The peft round trips run both ways: deltatune's file read by peft (coverage_cases.peft_loads_ours) and
peft's own adapter, built with deltatune's default config or with peft's defaults, read by deltatune
(coverage_peft.py); a case peft itself cannot build or run is skipped with peft's error."""
from __future__ import annotations

import pytest

import deltatune as dt

from coverage_cases import FLAKY, METHODS, PEFT_XFAIL, XFAIL, cases, peft_loads_ours, run_case
from coverage_peft import PEFT_DEFAULTS, PEFT_TO_US_XFAIL, PeftSide, we_load_peft_file
from zoo import FAMILIES, FAST

# hidden-32 models gain nothing from a second thread; on a shared machine it only spins (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _params(known):
    for family, column in cases():
        marks = [] if family in FAST else [pytest.mark.slow, pytest.mark.matrix]
        if (family, column) in known:
            marks.append(pytest.mark.xfail(strict=(family, column) not in FLAKY, reason=known[family, column]))
        yield pytest.param(family, column, marks=marks, id=f"{family}-{column}")


@pytest.mark.parametrize("family,column", list(_params(XFAIL)))
def test_case(family, column, tmp_path):
    run_case(family, column, tmp_path)  # a refusal returns (checked inside); anything else raises


@pytest.mark.parametrize("family,column", list(_params(PEFT_XFAIL)))
def test_peft_loads_our_file(family, column, tmp_path):
    pytest.importorskip("peft")
    if not peft_loads_ours(family, column, tmp_path):
        pytest.skip(f"{column} on {family}: no peft format, or refused at attach (checked by test_case)")


@pytest.mark.parametrize("family,column", [p for p in _params(PEFT_TO_US_XFAIL)
                                           if dt.METHODS[METHODS[p.values[1]][0]].peft_type])
def test_we_load_peft_file(family, column, tmp_path):
    pytest.importorskip("peft")
    try:
        applies = we_load_peft_file(family, column, tmp_path)
    except PeftSide as e:  # peft cannot build, run or save this case itself: known, not ours
        pytest.skip(str(e))
    if not applies:
        pytest.skip(f"{column} on {family}: no peft format, or refused at attach (checked by test_case)")


@pytest.mark.parametrize("family,column", [p for p in _params({}) if p.values[1] in PEFT_DEFAULTS])
def test_we_load_peft_file_with_peft_defaults(family, column, tmp_path):
    # peft picks the targets from its own per-architecture table; most small families have no entry there
    pytest.importorskip("peft")
    try:
        assert we_load_peft_file(family, column, tmp_path, peft_defaults=True)
    except PeftSide as e:
        pytest.skip(str(e))


def test_the_matrix_is_the_promised_size():
    # issue 13: 40+ architecture families of every kind, every registered method as a column
    import deltatune as dt

    kinds = {f.kind for f in FAMILIES.values()}
    assert len(FAMILIES) >= 55 and {"causal_lm", "seq_cls", "seq2seq", "image_cls", "audio_cls"} <= kinds
    assert {m for m, _ in METHODS.values()} == set(dt.METHODS), "a registered method is missing from the matrix"
    assert set(FAST) <= set(FAMILIES) and {FAMILIES[f].kind for f in FAST} == kinds
