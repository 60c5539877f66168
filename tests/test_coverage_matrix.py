"""The coverage matrix: every zoo family (tests/zoo.py) × every method with its default options,
each case a clear one-line refusal or the whole adapter contract (tests/coverage_cases.py).  A few
families of each kind run on every stop; the whole matrix (``-m slow``) is what docs/coverage.md
shows (scripts/gen_coverage.py).  Known bugs are strict xfails, listed in coverage_cases.XFAIL."""
from __future__ import annotations

import pytest

import deltatune as dt

from coverage_cases import FLAKY, METHODS, PEFT_XFAIL, XFAIL, cases, peft_loads_ours, run_case
from coverage_peft import PEFT_TO_US_XFAIL, PeftSide, we_load_peft_file
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


def test_the_matrix_is_the_promised_size():
    # issue 13: 40+ architecture families of every kind, every registered method as a column
    import deltatune as dt

    kinds = {f.kind for f in FAMILIES.values()}
    assert len(FAMILIES) >= 55 and {"causal_lm", "seq_cls", "seq2seq", "image_cls", "audio_cls"} <= kinds
    assert {m for m, _ in METHODS.values()} == set(dt.METHODS), "a registered method is missing from the matrix"
    assert set(FAST) <= set(FAMILIES) and {FAMILIES[f].kind for f in FAST} == kinds
