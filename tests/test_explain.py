"""`refattn explain`: add_explain / cmd_explain through a small argparse harness of their own."""

import argparse
import re
import struct
import zlib

import numpy as np
import pytest

import refattn
from refattn import RefattnError, patterns
from refattn.cli.study import add_explain, cmd_explain
from refattn.study.trace import trace

EXAMPLE = ["--pattern", "sliding_window", "--param", "left=3", "--param", "right=0", "--lq", "16", "--lk", "16",
           "--block", "4", "--row", "7"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="refattn")
    sub = parser.add_subparsers(dest="command")
    add_explain(sub)
    return parser.parse_args(["explain", *argv])


def run(capsys, argv):
    rc = cmd_explain(parse(argv))
    return rc, capsys.readouterr().out


def section(out: str, title: str) -> list[str]:
    """The lines of the section whose first line starts with ``title`` (up to a blank line)."""
    blocks = out.split("\n\n")
    found = [b for b in blocks if b.startswith(title)]
    assert found, f"no section {title!r} in:\n{out}"
    return found[0].splitlines()


def inputs(lq, lk, dim=4, heads=1, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, heads, lq, dim))
    k = rng.standard_normal((1, heads, lk, dim))
    v = rng.standard_normal((1, heads, lk, dim))
    dout = rng.standard_normal((1, heads, lq, dim))
    return q, k, v, dout


def test_the_example_sections_and_numbers(capsys):
    rc, out = run(capsys, EXAMPLE)
    assert rc == 0
    assert out.startswith("refattn explain: SlidingWindow(left=3, right=0, align='bottom_right')\n"
                          "Lq=16 Lk=16 D=4, blocks 4 x 4; q, k, v ~ N(0, 1), seed 0\n")
    mask = section(out, "mask")
    assert mask[1].split() == ["0", "4", "8", "12"]
    assert " 7  ....|####|....|....  <- row 7" in mask
    assert mask.count("    ----+----+----+----") == 3 and len(mask) == 2 + 16 + 3
    assert section(out, "block layout")[1:] == ["    J  0123", "  I=0  P...", "  I=1  PP..  <- row 7", "  I=2  .PP.",
                                                "  I=3  ..PP", "  7 of 16 tiles visited (0 full, 7 partial), 9 skipped"]
    visits = section(out, "query block I=1 (rows 4-7)")
    assert [line.split()[:3] for line in visits[1:]] == [["J=0", "keys", "0-3"], ["J=1", "keys", "4-7"],
                                                        ["J=2..3", "keys", "8-15"]]
    assert "skipped" in visits[3] and "partial" in visits[1] and "partial" in visits[2]
    # the table: the trace of the same inputs, to the printed precision
    q, k, v, _ = inputs(16, 16)
    mask_ = patterns.SlidingWindow(left=3, right=0).mask(16, 16)
    t = trace(q, k, v, mask_, block_q=4, block_k=4)
    oracle = refattn.forward(q, k, v, mask_)
    rows = section(out, "row 7")
    head = next(i for i, line in enumerate(rows) if line.split()[:2] == ["J", "keys"])
    body = [line.split() for line in rows[head + 1:head + 3]]
    want = t.row(0, 0, 7)
    for cells, r in zip(body, want):
        assert cells[:3] == [str(r["J"]), f"{r['keys'][0]}-{r['keys'][1] - 1}", r["kind"]]
        got = [float(x) for x in cells[3:]]
        exp = [r["block_max"], r["m"], r["alpha"], r["l"], *r["o_normalised"][:len(got) - 4]]
        np.testing.assert_allclose(got, exp, atol=1e-5)
    assert body[0][3:5] == ["-inf", "-inf"]           # row 7 has no key in block 0: m stays -inf
    final = re.search(r"final:  lse = m \+ log l = (\S+)", out).group(1)
    assert float(final) == t.lse[0, 0, 7]
    assert float(re.search(r"oracle: lse = (\S+)", out).group(1)) == oracle.lse[0, 0, 7]
    assert "out matches the oracle: yes" in out and "all 16 rows: out and lse match the oracle: yes" in out
    assert "backward" not in out


def test_every_line_fits_80_columns(capsys):
    for argv in (EXAMPLE + ["--backward"], ["--pattern", "causal", "--lq", "6", "--lk", "4", "--row", "0"],
                 ["--pattern", "dense", "--lq", "70", "--lk", "300", "--block", "8", "--block-k", "16",
                  "--backward"],
                 ["--pattern", "causal", "--lq", "64", "--block", "1", "--row", "63"],
                 ["--pattern", "bigbird", "--param", "block=2", "--lq", "40", "--block", "3", "--block-k", "5",
                  "--row", "39", "--backward"],
                 ["--pattern", "random", "--param", "per_row=3", "--heads", "3", "--head", "2", "--lq", "12",
                  "--dim", "7", "--backward"],
                 ["--pattern", "causal", "--lq", "600", "--lk", "700", "--block", "4"]):
        rc, out = run(capsys, argv)
        assert rc == 0, argv
        wide = [line for line in out.splitlines() if len(line) > 80]
        assert not wide, (argv, wide)


def test_backward_section(capsys):
    rc, out = run(capsys, EXAMPLE + ["--backward"])
    assert rc == 0
    q, k, v, dout = inputs(16, 16)
    mask = patterns.SlidingWindow(left=3, right=0).mask(16, 16)
    t = trace(q, k, v, mask, block_q=4, block_k=4, backward=True, dout=dout)
    bw = section(out, "backward")
    assert bw[2] == "  tiles (I,J) in order: (0,0) (1,0) (1,1) (2,1) (2,2) (3,2) (3,3)"
    assert float(re.search(r"D\[7\] = (\S+)", out).group(1)) == t.backward.D[0, 0, 7]
    ds = [line for line in bw if line.startswith("  J=")]
    assert ds[0].split() == ["J=0", "keys", "0-3:", ".", ".", ".", "."]
    np.testing.assert_allclose([float(x) for x in ds[1].split()[3:]], t.backward.tile(0, 0, 1, 1).ds[3], rtol=1e-3)
    assert "dS row matches the oracle's P * (dP - D): yes" in out
    assert re.search(r"dq matches the oracle: yes .*; dk, dv: yes", out)
    shown = re.search(r"dq\[7\]        = \[(.*), \.\.\.\]", out).group(1)
    np.testing.assert_allclose([float(x) for x in shown.split(", ")], t.backward.dq[0, 0, 7, :3], rtol=1e-6)


def test_an_empty_row(capsys):
    rc, out = run(capsys, ["--pattern", "causal", "--lq", "6", "--lk", "4", "--row", "1", "--backward"])
    assert rc == 0
    assert "final:  m = -inf, l = 0: row 1 has no allowed key, so O = 0 and lse = -inf" in out
    assert "oracle: lse = -inf  (the same)" in out and "out[1] = O/l = [0, 0, 0, ...]" in out
    assert "D[1] = 0" in out


def test_an_empty_query_block(capsys):
    rc, out = run(capsys, ["--pattern", "causal", "--lq", "10", "--lk", "4", "--row", "2"])
    assert rc == 0
    assert "  J=0  keys 0-3  skipped: empty tile, never visited" in out
    assert "(no key block visited: every row of this query block is empty)" in out
    assert "  (no visited block)" in out


def test_defaults_and_options(capsys):
    rc, out = run(capsys, ["--pattern", "causal"])     # Lq 16, block 4, row Lq // 2
    assert rc == 0 and "<- row 8" in out and "Lq=16 Lk=16 D=4, blocks 4 x 4" in out
    rc, out2 = run(capsys, ["--pattern", "causal", "--seed", "3", "--dim", "2"])
    assert "D=2" in out2 and "seed 3" in out2 and out2 != out
    rc, out = run(capsys, ["--pattern", "causal", "--lq", "16", "--block", "4", "--block-k", "8"])
    assert "blocks 4 x 8" in out and section(out, "block layout")[2] == "  I=0  P."
    rc, out = run(capsys, ["--pattern", "causal", "--lq", "100", "--max-size", "20"])
    mask = section(out, "mask, aggregated (5 x 5 entries per character")
    assert len(mask) == 21 and mask[11].endswith("<- row 50")


@pytest.mark.parametrize("name, params", [("lsh", ["buckets=4", "hashes=2", "chunk=4"]),
                                          ("routing", ["clusters=3"]), ("topk", ["k=3"]),
                                          ("nsa_select", ["block=4", "top_n=2"]), ("moba", ["block=4", "top_k=2"])])
def test_content_dependent_patterns_choose_from_the_traced_inputs(capsys, name, params):
    """The mask drawn and traced is the one the pattern chose from the q and k that the
    trace runs on (drawn from --seed), for two heads and a followed head of 1."""
    argv = ["--pattern", name, *sum((["--param", p] for p in params), []), "--lq", "16", "--block", "4",
            "--heads", "2", "--head", "1", "--seed", "7", "--backward"]
    rc, out = run(capsys, argv)
    assert rc == 0, out
    q, k, v, dout = inputs(16, 16, heads=2, seed=7)
    pat = patterns.get(name, **{p.split("=")[0]: int(p.split("=")[1]) for p in params})
    m = pat.mask(16, 16, q=q, k=k)
    drawn = [line[4:].replace("|", "") for line in section(out, "mask (")[2:] if "-+-" not in line]
    assert [row.split()[0] for row in drawn] == [refattn.study.draw.draw(m, h=1).splitlines()[i] for i in range(16)]
    t = trace(q, k, v, m, block_q=4, block_k=4)
    assert f"out[8] = O/l = [{t.out[0, 1, 8, 0]:.5f}, {t.out[0, 1, 8, 1]:.5f}" in out
    assert "all 16 rows of every head: out and lse match the oracle: yes" in out


@pytest.mark.parametrize("argv,match", [
    (EXAMPLE[:-2] + ["--row", "16"], r"--row 16 is out of range"),
    (EXAMPLE[:-2] + ["--row", "-1"], r"--row -1 is out of range"),
    (["--pattern", "causal", "--block", "0"], r"--block must be >= 1"),
    (["--pattern", "causal", "--block-k", "-2"], r"--block-k must be >= 1"),
    (["--pattern", "no_such_pattern"], r"unknown pattern 'no_such_pattern'"),
    (["--pattern", "bigbird"], r"pattern 'bigbird': .*block"),
    (["--pattern", "causal", "--param", "nope=1"], r"pattern 'causal'"),
    (["--pattern", "causal", "--head", "1"], r"--head 1 is out of range: this problem has 1 head"),
    (["--pattern", "causal", "--lq", "4096"], r"keep Lq \* Lk <="),
])
def test_errors(argv, match):
    with pytest.raises(RefattnError, match=match):
        cmd_explain(parse(argv))


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        parse(["--lq", "4"])                  # --pattern is required
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parse(["--pattern", "causal", "--lq", "0"])


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, width + 1)
    return width, height, depth, colour, raw[:, 1:]


def test_png_with_the_block_grid(capsys, tmp_path):
    path = tmp_path / "mask.png"
    rc, out = run(capsys, EXAMPLE + ["--png", str(path)])
    assert rc == 0
    assert out.rstrip().endswith(f"wrote {path} (512 x 512 pixels, with the block grid)")
    width, height, depth, colour, img = read_png(path)
    assert (width, height, depth, colour) == (512, 512, 8, 0)       # 16 cells of 32 pixels
    for edge in (128, 256, 384):                                   # block edges every 4 cells
        assert (img[edge, :] == 128).all() and (img[:, edge] == 128).all()
    assert img[7 * 32 + 5, 5 * 32 + 5] == 0 and img[7 * 32 + 5, 2 * 32 + 5] == 255   # (7, 5) allowed, (7, 2) not
    # a rectangular mask: the long side is about 512 pixels
    path2 = tmp_path / "rect.png"
    rc, out = run(capsys, ["--pattern", "causal", "--lq", "8", "--lk", "32", "--png", str(path2)])
    assert read_png(path2)[:2] == (512, 128)


def test_png_unwritable(capsys, tmp_path):
    with pytest.raises(RefattnError, match="cannot write"):
        cmd_explain(parse(EXAMPLE + ["--png", str(tmp_path / "no" / "such" / "dir.png")]))


def test_refattn_explain_through_the_cli(capsys):
    from refattn.cli import main
    assert main(["explain", "--pattern", "sliding_window", "--param", "left=3", "--param", "right=0",
                 "--lq", "16", "--block", "4", "--row", "7"]) == 0
    out = capsys.readouterr().out
    assert "row 7, after each visited key block J" in out and "out matches the oracle: yes" in out
    assert main(["explain", "--pattern", "causal", "--row", "99"]) == 1
    assert "row" in capsys.readouterr().err
