"""The one relative-error comparison of the test suite: ‖actual − expected‖ / ‖expected‖ in float64 against a
bound, where NaN and inf never pass and shapes, lengths and keys must match (``relative_error`` measures,
``assert_rel_close`` asserts, ``assert_within`` checks errors measured elsewhere, e.g. on spawned ranks); and the
suite's one rule for optional packages (``import_optional``).

``actual`` and ``expected`` are tensors or numbers, or equal-length sequences (same-key mappings) of them, nested
as deep as needed; a ``None`` in a sequence must face a ``None`` (an unused gradient) and is skipped. A sequence is
compared pair by pair (``joint=False``: every pair within the bound, the worst one named) or as one long vector
(``joint=True``: ‖all differences‖ / ‖all expected‖).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Mapping, Sequence

import pytest
import torch


def relative_error(actual, expected, *, joint: bool = False, same_infinities: bool = False) -> float:
    """‖actual − expected‖ / ‖expected‖ (‖actual − expected‖ where expected is all zeros), in float64.

    Never NaN: ``math.inf`` where either side holds a NaN or an infinity, so a maximum over errors (Python's, or an
    all-reduce across ranks) and ``error <= bound`` fail. With ``same_infinities`` infinities may appear, at the same
    places with the same signs on both sides, and are left out of the norms (the −inf log-sum-exp of a token that
    sees nothing). For sequences: the worst pair's error, or the joint error with ``joint``.

    Raises AssertionError on a shape, length or key mismatch, or when there is nothing to compare.
    """
    pairs = _pairs(actual, expected, "values")
    if joint:
        return _joint(pairs, same_infinities)[0]
    return max(_one(a, b, same_infinities)[0] for _, a, b in pairs)


def assert_rel_close(actual, expected, bound: float, what: str = "", *, joint: bool = False,
                     same_infinities: bool = False) -> float:
    """Assert ``relative_error(actual, expected) <= bound``; the failure names ``what``, the pair, the error, the
    element where actual and expected differ most and both values there (or where a NaN or inf sits).

    Returns: the (worst) relative error.
    """
    _check_bound(bound)
    pairs = _pairs(actual, expected, what or "values")
    if joint:
        error, detail = _joint(pairs, same_infinities)
        assert error <= bound, f"{what or 'values'} (jointly): relative error {error:.3e} > {bound:.1e}; {detail}"
        return error
    results = [(label, *_one(a, b, same_infinities)) for label, a, b in pairs]
    label, error, detail = max(results, key=lambda result: result[1])
    failing = sum(result[1] > bound for result in results)
    others = f" ({failing} of {len(results)} pairs fail)" if len(results) > 1 else ""
    assert error <= bound, f"{label}: relative error {error:.3e} > {bound:.1e}{others}; {detail}"
    return error


def assert_within(errors, bound: float, what: str = "") -> float:
    """Assert that every error already computed (a number, or a sequence or mapping of numbers, e.g. sent back by
    worker processes) is at most ``bound``; NaN fails. Returns the worst error."""
    _check_bound(bound)
    if isinstance(errors, Mapping):
        named = [(f"[{key!r}]", value) for key, value in errors.items()]
    elif isinstance(errors, Sequence) and not isinstance(errors, str):
        named = [(f"[{index}]", value) for index, value in enumerate(errors)]
    else:
        named = [("", errors)]
    assert named, f"{what or 'errors'}: no errors to check"
    worst_label, worst = named[0][0], -math.inf
    for label, value in named:
        value = float(value)
        if math.isnan(value):
            worst_label, worst = label, math.nan
            break
        if value > worst:
            worst_label, worst = label, value
    assert worst <= bound, f"{what or 'errors'}{worst_label} = {worst:.3e} > {bound:.1e}; all: {errors}"
    return worst


def import_optional(module: str, extra: str):
    """``module``, imported. The calling test (or, called at import time, the whole test module) is skipped only
    when the top-level package is not installed at all, the reason naming the extra to install; a package that is
    installed but fails to import raises its error, so a broken install fails instead of showing as skips."""
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed; install the {extra!r} extra (pip install -e '.[{extra}]')",
                    allow_module_level=True)
    return importlib.import_module(module)


def _check_bound(bound) -> None:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 <= bound < math.inf:
        raise ValueError(f"bound = {bound!r}; expected a finite number >= 0")


def _is_leaf(value) -> bool:
    return isinstance(value, (torch.Tensor, int, float))


def _pairs(actual, expected, label: str, *, outermost: bool = True) -> list:
    """[(label, actual float64 tensor, expected float64 tensor)] of every leaf pair, in order; a pair's label is
    ``label`` followed by its indices or keys."""
    if actual is None or expected is None:
        assert actual is None and expected is None, \
            f"{label}: {_kind(actual)} against expected {_kind(expected)}"
        return []
    if _is_leaf(actual) or _is_leaf(expected):
        assert _is_leaf(actual) and _is_leaf(expected), \
            f"{label}: {_kind(actual)} against expected {_kind(expected)}"
        a, b = _as_float64(actual), _as_float64(expected)
        assert a.shape == b.shape, f"{label}: shape {tuple(a.shape)} against expected {tuple(b.shape)}"
        return [(label, a, b)]
    if isinstance(actual, Mapping) or isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and isinstance(expected, Mapping), \
            f"{label}: {_kind(actual)} against expected {_kind(expected)}"
        missing, extra = set(expected) - set(actual), set(actual) - set(expected)
        assert not missing and not extra, \
            f"{label}: keys differ; missing {sorted(map(str, missing))}, extra {sorted(map(str, extra))}"
        pairs = [pair for key in expected
                 for pair in _pairs(actual[key], expected[key], f"{label}[{key!r}]", outermost=False)]
    else:
        actual, expected = list(actual), list(expected)
        assert len(actual) == len(expected), \
            f"{label}: {len(actual)} items against expected {len(expected)}"
        pairs = [pair for index, (a, b) in enumerate(zip(actual, expected))
                 for pair in _pairs(a, b, f"{label}[{index}]", outermost=False)]
    if outermost:
        assert pairs, f"{label}: nothing to compare: every pair is None or the sequences are empty"
    return pairs


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _as_float64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)


def _where(mask: torch.Tensor) -> tuple:
    """The index of the first True element of ``mask``."""
    flat = int(mask.reshape(-1).nonzero()[0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape)) if mask.dim() else ()


def _parts(a: torch.Tensor, b: torch.Tensor, same_infinities: bool) -> tuple:
    """(problem, difference, reference): the description of the first NaN or unmatched infinity (then None, None),
    else None, actual − expected and expected, each with matched infinities set to 0."""
    for name, x in (("actual", a), ("expected", b)):
        if torch.isnan(x).any():
            return f"NaN in {name} at {_where(torch.isnan(x))} ({int(torch.isnan(x).sum())} of {x.numel()})", \
                None, None
    infinite = torch.isinf(a) | torch.isinf(b)
    if not infinite.any():
        return None, a - b, b
    differ = infinite & (a != b)
    if not same_infinities or differ.any():
        index = _where(differ if differ.any() else infinite)
        return f"inf at {index}: actual {a[index].item()}, expected {b[index].item()}", None, None
    return None, torch.where(infinite, 0.0, a - b), torch.where(infinite, 0.0, b)


def _one(a: torch.Tensor, b: torch.Tensor, same_infinities: bool) -> tuple:
    """(relative error, where actual and expected differ most) of one pair."""
    problem, difference, reference = _parts(a, b, same_infinities)
    if problem:
        return math.inf, problem
    error = _ratio(difference.norm(), reference.norm())
    if difference.numel() == 0:
        return error, "no elements"
    index = _where(difference.abs() == difference.abs().max())
    return error, f"largest difference at {index}: actual {a[index].item():.6e}, expected {b[index].item():.6e}"


def _joint(pairs: list, same_infinities: bool) -> tuple:
    """(joint relative error, the worst pair's detail) over every pair."""
    squared_difference, squared_reference, worst = 0.0, 0.0, (-math.inf, "", "")
    for label, a, b in pairs:
        problem, difference, reference = _parts(a, b, same_infinities)
        if problem:
            return math.inf, f"{label}: {problem}"
        squared_difference += float(difference.square().sum())
        squared_reference += float(reference.square().sum())
        error, detail = _one(a, b, same_infinities)
        worst = max(worst, (error, label, detail), key=lambda item: item[0])
    return _ratio(math.sqrt(squared_difference), math.sqrt(squared_reference)), \
        f"worst pair {worst[1]}: relative error {worst[0]:.3e}, {worst[2]}"


def _ratio(difference, reference) -> float:
    difference, reference = float(difference), float(reference)
    error = difference / reference if reference > 0 else difference
    return error if math.isfinite(error) else math.inf
