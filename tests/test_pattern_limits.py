"""Integer pattern parameters are bounded (spec/patterns.md, "Parameters"): every one lies in
``[lowest, 2**40]`` (seeds in ``[0, 2**64 - 1]``) and is kept as a Python int, so a builder's
int64 arithmetic cannot wrap. Out of range is a `RefattnError`, never a crash (a fixed
pattern with ``block = 2**63 - 2`` once wrote out of bounds and killed the process), a
silently empty mask, or an OverflowError from a narrow NumPy integer."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from refattn import RefattnError, patterns
from refattn.patterns.base import MAX_PARAM
from refattn.patterns.examples import example, names_with_examples

L = 16
HUGE = [2**63 - 2, 2**63 - 1, 10**30, MAX_PARAM + 1]


def int_fields(p) -> list[str]:
    return [f.name for f in dataclasses.fields(p)
            if isinstance(getattr(p, f.name), int) and not isinstance(getattr(p, f.name), bool)]


def build(p, lq=L, lk=L):
    q = np.random.default_rng(0).standard_normal((1, 1, lq, 4))
    k = np.random.default_rng(1).standard_normal((1, 1, lk, 4))
    return p.mask(lq, lk, heads=1, q=q, k=k)


CASES = [(name, field) for name in names_with_examples()
         for field in int_fields(example(name, L, L)) if field != "seed"]


@pytest.mark.parametrize("name, field", CASES)
@pytest.mark.parametrize("value", HUGE)
def test_a_huge_parameter_is_an_error(name, field, value):
    d = {**example(name, L, L).to_dict(), field: value}
    with pytest.raises(RefattnError, match=rf"{field} must be an int in \[\d+, [0-9*]+\], got {value}"):
        patterns.from_dict(d)


@pytest.mark.parametrize("name, field", CASES)
def test_numpy_integers_are_kept_as_python_ints(name, field):
    p = example(name, L, L)
    value = getattr(p, field)
    if value > np.iinfo(np.int8).max:
        pytest.skip("the example's value does not fit an int8")
    q = patterns.from_dict({**p.to_dict(), field: np.int8(value)})
    assert type(getattr(q, field)) is int
    assert build(q) == build(p)


@pytest.mark.parametrize("name", [n for n in names_with_examples() if "seed" in int_fields(example(n, L, L))])
def test_seeds_take_every_uint64(name):
    p = example(name, L, L)
    for seed in (np.int8(3), 2**64 - 1):
        q = patterns.from_dict({**p.to_dict(), "seed": seed})
        assert type(q.seed) is int and q.seed == int(seed)
        build(q)
    with pytest.raises(RefattnError, match=r"seed must be an int in \[0, 2\*\*64 - 1\]"):
        patterns.from_dict({**p.to_dict(), "seed": 2**64})


@pytest.mark.parametrize("lq, lk", [(16, 8), (8, 16), (16, 16)])
def test_the_largest_parameters_build_in_any_alignment(lq, lk):
    """At the bound, with Lq > Lk (negative query positions) too, the builders stay in
    range: the same masks as any parameter past the lengths."""
    assert patterns.Fixed(MAX_PARAM, 1).mask(lq, lk) == patterns.Fixed(10**6, 1).mask(lq, lk)
    assert patterns.SlidingWindow(3, MAX_PARAM).mask(lq, lk) == patterns.SlidingWindow(3, 10**6).mask(lq, lk)
    assert patterns.SlidingWindow(MAX_PARAM, MAX_PARAM).mask(lq, lk) == patterns.Dense().mask(lq, lk)


def test_the_segfault_of_issue_19_is_an_error_in_a_child_process():
    code = ("from refattn import patterns\n"
            "patterns.from_dict({'name': 'fixed', 'block': 2**63 - 2, 'summary': 1}).mask(16, 8)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.returncode          # a Python exception, not SIGSEGV (-11)
    assert "RefattnError: fixed.block must be an int in [1, 2**40]" in proc.stderr


def test_the_cli_says_it_in_one_line(capsys):
    from refattn.cli import main

    rc = main(["show", "fixed", "--param", "block=9223372036854775806", "--param", "summary=1",
               "--lq", "16", "--lk", "8"])
    err = capsys.readouterr().err
    assert rc == 1 and err == "refattn show: error: fixed.block must be an int in [1, 2**40], got 9223372036854775806\n"


@pytest.mark.parametrize("make, message", [
    (lambda: patterns.Lsh(buckets=2**31), r"lsh.buckets must be an int in \[2, 16384\]"),
    (lambda: patterns.Lsh(buckets=8, hashes=2**62), r"lsh.hashes must be an int in \[1, 64\]"),
    (lambda: patterns.Routing(clusters=2**20), r"routing.clusters must be an int in \[1, 16384\]"),
    (lambda: patterns.Routing(clusters=4, iterations=2**62), r"routing.iterations must be an int in \[0, 1000\]"),
])
def test_the_costly_content_parameters_are_bounded(make, message):
    """Hashing and clustering cost more than the mask's size: their parameters have bounds of
    their own (lsh with hashes = 2**62 once ran forever; buckets = 2**31 asked for 64 GiB)."""
    with pytest.raises(RefattnError, match=message):
        make()
