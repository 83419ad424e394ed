"""tests/checks.py: the comparison fails on NaN, inf, shape, length and key mismatches and real differences, and
passes on equal inputs; the optional-import rule skips only what is not installed."""

import math

import pytest
import torch

from checks import assert_rel_close, assert_within, import_optional, relative_error


def test_equal_inputs_pass_with_zero_error():
    x = torch.randn(3, 5, dtype=torch.float64)
    assert assert_rel_close(x, x.clone(), 0.0) == 0.0
    assert assert_rel_close([x, 2.0, None], [x.clone(), 2.0, None], 0.0) == 0.0
    assert assert_rel_close({"a": x, "b": [x]}, {"b": [x.clone()], "a": x.clone()}, 0.0, joint=True) == 0.0
    assert assert_rel_close(torch.zeros(4), torch.zeros(4), 0.0) == 0.0  # expected zero: the absolute error


def test_the_error_is_the_ratio_of_norms():
    # ‖(0, 0.5)‖ / ‖(3, 4)‖ = 0.5 / 5
    assert relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])) == pytest.approx(0.1, rel=1e-15)
    assert relative_error(torch.tensor([0.5, 0.0]), torch.zeros(2)) == pytest.approx(0.5, rel=1e-15)
    assert relative_error(3.3, 3.0) == pytest.approx(0.1, rel=1e-14)


def test_a_real_difference_fails_naming_the_worst_element():
    expected = torch.ones(2, 3, dtype=torch.float64)
    actual = expected.clone()
    actual[1, 2] = 1.5
    with pytest.raises(AssertionError, match=r"the output: relative error .* > 1\.0e-03; largest difference at "
                                             r"\(1, 2\): actual 1\.5.*, expected 1\.0"):
        assert_rel_close(actual, expected, 1e-3, "the output")
    assert assert_rel_close(actual, expected, 0.3) == pytest.approx(0.5 / math.sqrt(6), rel=1e-12)


@pytest.mark.parametrize("side", ["actual", "expected"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_fail_on_either_side(side, bad):
    good = torch.ones(4, dtype=torch.float64)
    poisoned = good.clone()
    poisoned[2] = bad
    pair = (poisoned, good) if side == "actual" else (good, poisoned)
    name = f"NaN in {side} at" if math.isnan(bad) else "inf at"
    with pytest.raises(AssertionError, match=rf"{name} \(2,\)"):
        assert_rel_close(*pair, 1e30)
    assert relative_error(*pair) == math.inf  # never NaN: a maximum over errors or a bound still fails


def test_nan_among_small_errors_is_not_hidden():
    """max([1e-16, nan]) <= 1e-10 is True in Python; over relative_error's values it is not."""
    good = [torch.ones(3), torch.ones(3)]
    bad = [torch.ones(3) + 1e-16, torch.tensor([1.0, math.nan, 1.0])]
    with pytest.raises(AssertionError, match=r"grads\[1\].*NaN in actual"):
        assert_rel_close(bad, good, 1e-10, "grads")
    with pytest.raises(AssertionError, match="NaN in actual"):
        assert_rel_close(bad, good, 1e-10, "grads", joint=True)
    assert not max(relative_error(a, b) for a, b in zip(bad, good)) <= 1e-10


def test_same_infinities_allows_matching_infinities_only():
    lse = torch.tensor([-math.inf, 0.5, 2.0], dtype=torch.float64)
    assert assert_rel_close(lse, lse.clone(), 0.0, same_infinities=True) == 0.0
    with pytest.raises(AssertionError, match="inf at"):
        assert_rel_close(lse, lse.clone(), 0.0)
    for other in (torch.tensor([math.inf, 0.5, 2.0]), torch.tensor([-math.inf, -math.inf, 2.0]),
                  torch.tensor([0.0, 0.5, 2.0])):
        with pytest.raises(AssertionError, match="inf at"):
            assert_rel_close(other, lse, 1e30, same_infinities=True)
    with pytest.raises(AssertionError, match="NaN"):
        assert_rel_close(torch.tensor([math.nan, 0.5, 2.0]), lse, 1e30, same_infinities=True)


def test_shape_length_and_key_mismatches_fail():
    with pytest.raises(AssertionError, match=r"shape \(3,\) against expected \(1, 3\)"):
        assert_rel_close(torch.ones(3), torch.ones(1, 3), 1.0)  # no broadcasting
    with pytest.raises(AssertionError, match=r"grads: 2 items against expected 3"):
        assert_rel_close([torch.ones(2)] * 2, [torch.ones(2)] * 3, 1.0, "grads")
    with pytest.raises(AssertionError, match=r"\[1\]: 1 items against expected 2"):
        assert_rel_close([1.0, [2.0]], [1.0, [2.0, 3.0]], 1.0)
    with pytest.raises(AssertionError, match=r"keys differ; missing \['b'\], extra \['c'\]"):
        assert_rel_close({"a": 1.0, "c": 2.0}, {"a": 1.0, "b": 2.0}, 1.0)
    with pytest.raises(AssertionError, match=r"values\[0\]: None against expected a tensor"):
        assert_rel_close([None], [torch.ones(2)], 1.0)
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_rel_close([], [], 1.0)
    with pytest.raises(AssertionError, match="nothing to compare"):
        relative_error([None], [None])


def test_each_pair_or_all_pairs_jointly():
    """A pair with a small norm may be far off on its own scale and still close within the whole."""
    expected = [torch.full((10,), 10.0), torch.full((10,), 1e-3)]
    actual = [expected[0].clone(), torch.full((10,), 2e-3)]
    assert assert_rel_close(actual, expected, 1e-3, joint=True) < 1e-3
    with pytest.raises(AssertionError, match=r"\[1\]: relative error 1\.000e\+00 > 1\.0e-03 \(1 of 2 pairs fail\)"):
        assert_rel_close(actual, expected, 1e-3)
    assert relative_error(actual, expected) == pytest.approx(1.0, rel=1e-12)


def test_errors_computed_elsewhere_are_checked_with_nan_failing():
    assert assert_within([1e-12, 3e-11], 1e-10) == 3e-11
    assert assert_within({"loss": 0.0, "grads": 1e-11}, 1e-10) == 1e-11
    with pytest.raises(AssertionError, match=r"sp\[1\] = nan"):
        assert_within([1e-16, math.nan, 0.0], 1e-10, "sp")
    with pytest.raises(AssertionError, match=r"\['grads'\] = 2\.000e-09 > 1\.0e-10"):
        assert_within({"loss": 0.0, "grads": 2e-9}, 1e-10)
    with pytest.raises(AssertionError, match="no errors"):
        assert_within([], 1e-10)


@pytest.mark.parametrize("bound", [math.nan, math.inf, -1.0, "1e-5", None])
def test_a_bound_that_is_not_a_finite_number_is_refused(bound):
    with pytest.raises(ValueError, match="bound = .*; expected a finite number >= 0"):
        assert_rel_close(torch.ones(2), torch.ones(2), bound)


def test_import_optional_skips_only_what_is_not_installed(tmp_path, monkeypatch):
    with pytest.raises(pytest.skip.Exception, match="no_such_package_xyz is not installed; install the 'ray' extra"):
        import_optional("no_such_package_xyz.sub", "ray")
    broken = tmp_path / "broken_package_xyz"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="a broken install"):
        import_optional("broken_package_xyz", "ray")
    assert import_optional("math", "none") is math


def test_xdist_groups_reach_the_scheduler(tmp_path):
    """`make test` puts every Ray test on one xdist worker (--dist loadgroup): the group must reach the nodeid the
    scheduler splits on, for a static mark and for one added at collection (tests/conftest.py's ONE_WORKER_MODULES).
    pytest 9.2 with pytest-xdist 3.8 broke both without a word (pyproject.toml pins pytest below 9.2)."""
    import subprocess
    import sys

    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n@pytest.hookimpl(tryfirst=True)\ndef pytest_collection_modifyitems(items):\n"
        "    for item in items:\n"
        "        if item.name.startswith('test_added'):\n"
        "            item.add_marker(pytest.mark.xdist_group('added'))\n")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n\n@pytest.mark.xdist_group('static')\ndef test_static(request):\n"
        "    assert request.node.nodeid.endswith('@static'), request.node.nodeid\n\n"
        "def test_added(request):\n    assert request.node.nodeid.endswith('@added'), request.node.nodeid\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                           "no:cacheprovider", "test_inner.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
