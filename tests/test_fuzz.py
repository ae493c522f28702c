"""Property-based fuzzing of what users and files hand refattn (issue 19): the public API,
the pattern registry, masks, the file readers and the command line. The only outcomes
allowed are a correct result or a `RefattnError` (from the command line: exit 0, or one
line ``refattn NAME: error: ...`` with exit 1, or argparse's usage error with exit 2): no
other exception, no crash, no hang, no silent wrong value.

Runs in the default test run with a fixed budget of examples per test (`BUDGET`, derandomized
so that CI tries the same inputs every time); their sum is the count of inputs tried."""

import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import refattn
from refattn import Mask, RefattnError, golden, patterns
from refattn.cli import main
from refattn.golden.trust import load_case
from refattn.patterns.examples import example, names_with_examples

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
BY_ID = {e["id"]: e for e in MANIFEST["cases"]}

#: Examples per test; the sum over this module is the number of inputs tried per run.
BUDGET = {"forward": 400, "backward": 300, "patterns": 400, "mask": 200, "case_file": 300, "entry": 300,
          "cli": 150}


def fuzz(name: str):
    return settings(max_examples=BUDGET[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- values: the ordinary, the edge and the hostile -------------------------------------------------------

NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 7, 64, 2**31, 2**40, 2**40 + 1, 2**63 - 2, 2**64, 10**30, -(10**30)]),
    st.integers(-5, 70),
    st.sampled_from([0.0, -0.0, 0.5, 1e-300, 1e300, -1e300, 1.5e308, math.inf, -math.inf, math.nan]),
    st.sampled_from([np.int8(3), np.int64(5), np.uint64(2**63), np.float32(0.25), np.bool_(True)]),
)
VALUES = st.recursive(
    st.one_of(NUMBERS, st.none(), st.booleans(), st.sampled_from(["", "x", "top_left", "bottom_right", "causal"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["name", "terms", "a"]),
                                                                          inner, max_size=3)),
    max_leaves=8)
BACKENDS = [b for b in refattn.backends.names() if b != "cuda"]      # cuda: its own tests, on its simulator


# ---- forward and backward ----------------------------------------------------------------------------------

@st.composite
def problems(draw):
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 2))
    Lq, Lk, D, Dv = (draw(st.integers(1, 6)) for _ in range(4))
    # mostly ordinary problems, so that results are compared with the oracle; now and then hostile
    dtype = draw(st.sampled_from(["float64"] * 4 + ["float32"] * 2 + ["float16", "int64", "bool", "complex128"]))
    kind = draw(st.sampled_from(["normal"] * 8 + ["huge", "tiny", "nan", "inf"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def tensor(shape):
        with np.errstate(all="ignore"):                          # huge values overflow: that is the point
            return make(shape)

    def make(shape):
        x = rng.standard_normal(shape)
        if kind == "huge":
            x = x * 10.0 ** draw(st.integers(100, 308))
        elif kind == "tiny":
            x = x * 1e-300
        elif kind in ("nan", "inf") and x.size and draw(st.booleans()):
            x.flat[rng.integers(x.size)] = np.nan if kind == "nan" else np.inf
        return x.astype(dtype) if dtype != "bool" else x > 0

    q, k, v = tensor((B, H, Lq, D)), tensor((B, Hkv, Lk, D)), tensor((B, Hkv, Lk, Dv))
    if draw(st.integers(0, 7)) == 0:                             # a shape out of place now and then
        q = tensor((B, H, Lq, D + 1)) if draw(st.booleans()) else tensor((B, H + 1, Lq, D))
    mask = draw(st.sampled_from([None, "causal", "window", "random", "empty"]))
    if mask == "causal":
        mask = patterns.Causal().mask(Lq, Lk)
    elif mask == "window":
        mask = patterns.SlidingWindow(1, 1).mask(Lq, Lk)
    elif mask == "random":
        mask = Mask.from_dense(rng.random((Lq, Lk)) < 0.5)
    elif mask == "empty":
        mask = Mask.empty(Lq, Lk)
    options = draw(st.sampled_from([{}] * 3 + [{"scale": 0.5}, {"softcap": 2.0}, {"scale": 1e300},
                                                {"softcap": -1.0}, {"scale": math.nan}, {"scale": "x"},
                                                {"softcap": 10**400}]))
    compute = draw(st.sampled_from([None] * 4 + ["float32"] * 2 + ["flaot32"]))
    return q, k, v, mask, options, draw(st.sampled_from(BACKENDS)), compute


def close_to_oracle(got, want, compute) -> bool:
    tol = 1e-9 if compute != "float32" else 1e-3
    fin = np.isfinite(want)
    return np.array_equal(np.isfinite(got), fin) and (got[~fin] == want[~fin]).all() and \
        np.allclose(got[fin], want[fin], rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(want[fin]), initial=0))))


@fuzz("forward")
@given(problems())
def test_forward_is_right_or_refuses(problem):
    q, k, v, mask, options, backend, compute = problem
    with np.errstate(all="ignore"):
        try:
            r = refattn.forward(q, k, v, mask, backend=backend, compute_dtype=compute, **options)
        except RefattnError:
            event("refused")
            return
        event("computed")
        ref = refattn.forward(q, k, v, mask, **options)       # the oracle must agree that it is computable
    assert np.isfinite(r.out).all() and not np.isnan(r.lse).any() and not (r.lse == np.inf).any()
    assert close_to_oracle(np.asarray(r.out, np.float64), ref.out, compute)
    assert close_to_oracle(np.asarray(r.lse, np.float64), ref.lse, compute)


@fuzz("backward")
@given(problems(), st.sampled_from(["ok"] * 4 + ["huge", "nan", "shape", "lse"]))
def test_backward_is_right_or_refuses(problem, dout_kind):
    q, k, v, mask, options, backend, compute = problem
    with np.errstate(all="ignore"):
        try:
            r = refattn.forward(q, k, v, mask, **options)
        except RefattnError:
            return
        dout = np.ones(r.out.shape)
        lse = r.lse
        if dout_kind == "huge":
            dout = dout * 1e308
        elif dout_kind == "nan":
            dout.flat[0] = np.nan
        elif dout_kind == "shape":
            dout = np.ones(r.out.shape[:-1] + (r.out.shape[-1] + 1,))
        elif dout_kind == "lse":
            lse = lse - 800.0
        try:
            g = refattn.backward(q, k, v, r.out, lse, dout, mask, backend=backend, compute_dtype=compute, **options)
        except RefattnError:
            event("refused")
            return
        event("computed")
        ref = refattn.backward(q, k, v, r.out, lse, dout, mask, **options)
    for name in ("dq", "dk", "dv"):
        assert close_to_oracle(np.asarray(getattr(g, name), np.float64), getattr(ref, name), compute), name


# ---- patterns ---------------------------------------------------------------------------------------------------

FIELDS = ["left", "right", "block", "seed", "align", "causal", "terms", "base", "k", "lengths", "stride",
          "summary", "window", "sinks", "prefix", "chunk", "buckets", "hashes", "indices", "per_row", "layout",
          "dilation", "kernel", "height", "width", "top_k", "top_n", "clusters", "iterations", "segment_ids", "x"]


@st.composite
def pattern_params(draw):
    """A registered pattern's valid example parameters (spec/patterns.md), with up to two of
    them replaced by anything, and now and then an unknown one."""
    name = draw(st.sampled_from(names_with_examples()))
    params = {k: v for k, v in example(name, 12, 12).to_dict().items() if k != "name"}
    for field in draw(st.lists(st.sampled_from(sorted(params) or FIELDS), max_size=2)):
        params[field] = draw(VALUES)
    if draw(st.integers(0, 9)) == 0:
        params[draw(st.sampled_from(FIELDS))] = draw(VALUES)
    return name, params


@fuzz("patterns")
@given(pattern_params(), st.integers(1, 12), st.integers(1, 12), st.sampled_from([None, 1, 2]))
def test_patterns_build_or_refuse(name_params, lq, lk, heads):
    name, params = name_params
    try:
        p = patterns.get(name, **params)
        q = np.random.default_rng(0).standard_normal((1, heads or 1, lq, 4))
        k = np.random.default_rng(1).standard_normal((1, heads or 1, lk, 4))
        m = p.mask(lq, lk, heads=heads, q=q, k=k)
        again = patterns.from_dict(p.to_dict()).mask(lq, lk, heads=heads, q=q, k=k)
    except RefattnError:
        event("refused")
        return
    event("built")
    assert isinstance(m, Mask) and m.matrix_shape == (lq, lk) and m == again


@fuzz("patterns")
@given(VALUES)
def test_from_dict_builds_or_refuses(d):
    try:
        p = patterns.from_dict(d)
    except RefattnError:
        event("refused")
        return
    event("built")
    assert isinstance(p, patterns.Pattern)


# ---- masks --------------------------------------------------------------------------------------------------------

@st.composite
def csr_arrays(draw):
    """A valid CSR of a random mask, then (half the time) one part of it damaged."""
    lq, lk = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dense = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random((lq, lk)) < 0.5
    indptr = np.concatenate([[0], np.cumsum(dense.sum(axis=1))])
    indices = np.nonzero(dense)[1]
    shape = (lq, lk)
    damage = draw(st.sampled_from(["none", "none", "none", "indptr", "indices", "shape", "dtype", "order"]))
    if damage == "indptr" and indptr.size:
        indptr = indptr.copy()
        indptr[draw(st.integers(0, indptr.size - 1))] += draw(st.sampled_from([-1, 1, 100]))
    elif damage == "indices" and indices.size:
        indices = indices.copy()
        indices[draw(st.integers(0, indices.size - 1))] = draw(st.sampled_from([-1, lk, 2**40]))
    elif damage == "shape":
        shape = draw(st.tuples(st.integers(-1, 9), st.integers(-1, 9)))
    elif damage == "order" and indices.size > 1:
        indices = indices[::-1].copy()
    dtype = draw(st.sampled_from(["int64", "int32", "float64", "uint8"])) if damage == "dtype" else "int64"
    return indptr, indices, shape, dtype, dense if damage == "none" else None


@fuzz("mask")
@given(csr_arrays())
def test_masks_from_arrays_build_or_refuse(arrays):
    indptr, indices, shape, dtype, dense = arrays
    try:
        m = Mask.from_indices(np.asarray(indptr).astype(dtype), np.asarray(indices).astype(dtype), shape)
    except RefattnError:
        event("refused")
        assert dense is None, "a valid CSR was refused"
        return
    event("built")
    assert m.matrix_shape == shape and Mask.from_dense(m.to_dense()) == m
    if dense is not None:
        assert np.array_equal(m.to_dense(), dense)


# ---- the file readers -------------------------------------------------------------------------------------------

CASE_BYTES = (GOLDEN / "cases" / "pattern-causal.npz").read_bytes()


@st.composite
def damaged_case_files(draw):
    data = bytearray(CASE_BYTES)
    how = draw(st.sampled_from(["flip", "truncate", "insert", "random", "zip"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif how == "random":
        data = bytearray(draw(st.binary(max_size=512)))
    else:                                       # a well-formed zip of odd members
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for _ in range(draw(st.integers(0, 3))):
                zf.writestr(draw(st.sampled_from(["q.npy", "x", "../a.npy", "out.npy"])), draw(st.binary(max_size=200)))
        data = bytearray(buf.getvalue())
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@fuzz("case_file")
@given(damaged_case_files())
def test_case_files_parse_or_refuse(data):
    try:
        arrays = golden.casefile.parse_case(data, "fuzzed.npz")
    except RefattnError:
        event("refused")
        return
    event("read")
    assert all(isinstance(a, np.ndarray) and a.dtype in golden.casefile.ARRAY_DTYPES for a in arrays.values())


ENTRY_KEYS = ["id", "file", "bytes", "sha256", "shape", "scale", "softcap", "dropout_p", "dlse", "bias", "mask",
              "allowed", "baselines"]


@fuzz("entry")
@given(st.sampled_from(["pattern-causal", "feature-dense-bias", "feature-dropout"]),
       st.dictionaries(st.sampled_from(ENTRY_KEYS), VALUES, max_size=3),
       st.lists(st.sampled_from(ENTRY_KEYS), max_size=2))
def test_manifest_entries_load_or_refuse(tmp_path_factory, cid, changes, removed):
    folder = tmp_path_factory.mktemp("suite")
    (folder / "cases").mkdir()
    shutil.copy(GOLDEN / "cases" / f"{cid}.npz", folder / "cases")
    entry = {**json.loads(json.dumps(BY_ID[cid])), **changes}
    for key in removed:
        entry.pop(key, None)
    try:
        arrays = load_case(folder, entry)
    except RefattnError:
        event("refused")
        return
    event("loaded")
    assert arrays["q"].shape == tuple(BY_ID[cid]["shape"][k] for k in ("B", "H", "Lq", "D"))


# ---- the command line ---------------------------------------------------------------------------------------------

FLAGS = ["--lq", "--lk", "--dim", "--heads", "--kv-heads", "--param", "--filter", "--golden", "--dtype", "--backend",
         "--pattern", "--block", "--row", "--n", "--from", "--to", "--layers", "--seq", "--schedule", "--head",
         "--max-size", "--compute-dtype", "--seed", "--json", "--timeout", "--layout", "--framework", "--out"]
TOKENS = ["0", "1", "3", "-1", "8", "x", "", "nan", "1e3", "causal", "sliding_window", "left=1", "right=0",
          "block=4", "left=1e400", "pattern-*", "float32", "bfloat16", "dense", "cpu", "none", "sqrt", "all",
          "/dev/null", "/nonexistent/x", "bshd", "torch", "{", "[[[]]]", "refattn.adapters:dense", "--"]


@fuzz("cli")
@given(st.sampled_from(["run", "patterns", "show", "paths", "explain", "golden list", "golden check", "verify",
                        "checkpoint", "nope", ""]),
       st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(TOKENS)), max_size=6))
def test_the_command_line_answers_or_says_why(command, words):
    argv = command.split() + words
    if command == "verify" and not any(w.startswith("--golden") for w in words):
        argv += ["--golden", str(GOLDEN), "--filter", "shape-l1"]
    if command == "golden check":
        argv += ["--filter", "shape-l1"]
    out, err = io.StringIO(), io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
            event(f"exit {rc}")
            assert rc in (0, 2), (argv, rc)
            assert rc == 0 or "usage: refattn" in err.getvalue() or "error:" in err.getvalue()
            return
    text = err.getvalue()
    assert "Traceback" not in text and "Traceback" not in out.getvalue(), argv
    assert rc in (0, 1), (argv, rc)
    event(f"exit {rc}")
    if rc == 1 and command not in ("verify", "golden check"):         # those print a verdict table and exit 1
        lines = [line for line in text.splitlines() if not line.startswith("refattn: ")]   # notices aside
        assert len(lines) == 1 and lines[0].startswith(f"refattn {argv[0]}: error: "), (argv, text)
