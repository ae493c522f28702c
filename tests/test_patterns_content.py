"""Content-dependent patterns (lsh, routing, topk, nsa_select, moba) against brute force.

Every reference below is written from spec/patterns.md ("Content-dependent patterns" and
"The random draw") in plain Python floats and integers, independently of
refattn/patterns/content.py: a dot product is ``((x_0 y_0 + x_1 y_1) + x_2 y_2) + ...``
(Python floats: each product and each sum rounded, no FMA), a sum over positions runs in
increasing position, a mean is that sum divided by the count.

Inputs come in two kinds: ``grid`` (standard normals rounded to multiples of 1/64 and
clipped to [-4, 4], with deliberately duplicated rows / blocks and zero rows, so that the
tie rules really decide) and ``float`` (plain standard normals).
"""

import math

import numpy as np
import pytest

import refattn
from refattn import Mask, RefattnError, patterns

from .reference_draw import reference_draw, splitmix64

# ---- float arithmetic in the stated order -----------------------------------------------

def dot(x, y):
    """((x_0 y_0 + x_1 y_1) + x_2 y_2) + ... in Python floats (no FMA)."""
    s = 0.0
    for a, b in zip(x, y):
        s += a * b
    return s


def vsum(vectors, D):
    """Component-wise sum of the vectors, in the order given."""
    s = [0.0] * D
    for v in vectors:
        for d in range(D):
            s[d] += v[d]
    return s


def mean(vectors, D):
    s = vsum(vectors, D)
    return [x / len(vectors) for x in s]


def grid(rng, shape):
    """The golden input grid: multiples of 1/64 in [-4, 4]."""
    return np.clip(np.round(rng.standard_normal(shape) * 64) / 64, -4, 4)


def as4d(q, k):
    q = np.asarray(q, np.float64)
    k = None if k is None else np.asarray(k, np.float64)
    if q.ndim == 2:
        q = q[None, None]
        k = None if k is None else k[None, None]
    return q, k


# ---- brute-force references ---------------------------------------------------------------

def lsh_rotation(seed, h, r, D, buckets):
    """R[h, r]: D x buckets/2, entry (d, t) from the hash of (seed, h, r, d * buckets/2 + t)."""
    half = buckets // 2
    R = [[0.0] * half for _ in range(D)]
    for d in range(D):
        for t in range(half):
            u = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ h) ^ r) ^ (d * half + t))
            w = [(u >> (16 * s)) & 0xFFFF for s in range(4)]
            R[d][t] = (w[0] + w[1] + w[2] + w[3] - 131070) / 32768
    return R


def lsh_bucket(x, R):
    """argmax(concat(x R, -x R)), the lowest index on ties."""
    D, half = len(R), len(R[0])
    proj = [dot(x, [R[d][t] for d in range(D)]) for t in range(half)]
    vals = proj + [-p for p in proj]
    best = 0
    for idx in range(1, len(vals)):
        if vals[idx] > vals[best]:
            best = idx
    return best


def brute_lsh(q, k, buckets, hashes=1, chunk=None, shared_qk=True, causal=False, seed=0):
    q, k = as4d(q, k)
    B, H, Lq, D = q.shape
    if shared_qk:
        Lk = Lq
    else:
        Hkv, Lk = k.shape[1], k.shape[2]
        G = H // Hkv
    out = np.zeros((B, H, Lq, Lk), bool)
    for h in range(H):
        Rs = [lsh_rotation(seed, h, r, D, buckets) for r in range(hashes)]
        for b in range(B):
            qb = [[lsh_bucket(x, R) for x in q[b, h].tolist()] for R in Rs]     # [r][i]
            if shared_qk:
                L = Lq
                rows = [set() for _ in range(L)]
                if chunk is None:
                    for i in range(L):
                        for j in range(L):
                            if any(qb[r][i] == qb[r][j] for r in range(hashes)):
                                rows[i].add(j)
                else:
                    seq = []
                    for r in range(hashes):
                        seq += sorted(range(L), key=lambda p, r=r: (qb[r][p], p))
                    nch = -(-len(seq) // chunk)
                    chunks = [seq[c * chunk:(c + 1) * chunk] for c in range(nch)]
                    for s, pos in enumerate(seq):
                        c = s // chunk
                        rows[pos].update(chunks[c])
                        rows[pos].update(chunks[(c - 1) % nch])
                for i in range(L):
                    row = {j for j in rows[i] if not (causal and j > i)}
                    assert i in row
                    others = row - {i}
                    for j in (others if others else {i}):
                        out[b, h, i, j] = True
            else:
                kb = [[lsh_bucket(x, R) for x in k[b, h // G].tolist()] for R in Rs]
                for i in range(Lq):
                    for j in range(Lk):
                        if causal and j > i + Lk - Lq:
                            continue
                        if any(qb[r][i] == kb[r][j] for r in range(hashes)):
                            out[b, h, i, j] = True
    return out


def normalize(x):
    n = math.sqrt(dot(x, x))
    return list(x) if n == 0 else [a / n for a in x]


def brute_routing(q, k, clusters, iterations=10, causal=False, seed=0):
    q, k = as4d(q, k)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    n = Lq + Lk
    out = np.zeros((B, H, Lq, Lk), bool)
    for b in range(B):
        for h in range(H):
            pts = [normalize(x) for x in q[b, h].tolist()] + \
                  [normalize(x) for x in k[b, h // G].tolist()]
            init = reference_draw(seed, h, b, n, clusters)
            assert len(init) == clusters
            mu = [pts[p] for p in init]

            def assign(pts, mu):
                a = []
                for x in pts:
                    best, bv = 0, dot(x, mu[0])
                    for c in range(1, clusters):
                        v = dot(x, mu[c])
                        if v > bv:
                            best, bv = c, v
                    a.append(best)
                return a

            for _ in range(iterations):
                a = assign(pts, mu)
                new = []
                for c in range(clusters):
                    members = [pts[p] for p in range(n) if a[p] == c]
                    s = vsum(members, D)
                    if not members or all(v == 0 for v in s):
                        new.append(mu[c])
                    else:
                        ns = math.sqrt(dot(s, s))
                        new.append([v / ns for v in s])
                mu = new
            a = assign(pts, mu)
            for i in range(Lq):
                for j in range(Lk):
                    if a[i] == a[Lq + j] and not (causal and j > i + Lk - Lq):
                        out[b, h, i, j] = True
    return out


def base_candidates(base, B, H, Lq, Lk):
    """Candidate keys of the bases used below, from their own spec rules (not refattn)."""
    off = Lk - Lq
    i = np.arange(Lq)[:, None] + off
    j = np.arange(Lk)[None, :]
    if base is None:
        m = np.ones((Lq, Lk), bool)
    elif base[0] == "causal":
        m = j <= i
    elif base[0] == "window":
        _, left, right = base
        m = (j >= i - left) & (j <= i + right)
    elif base[0] == "random":                  # Random(per_row, seed), non-causal, per head
        _, per_row, seed = base
        m = np.zeros((H, Lq, Lk), bool)
        for h in range(H):
            for r in range(Lq):
                m[h, r, reference_draw(seed, h, r, Lk, per_row)] = True
        return np.broadcast_to(m[None], (B, H, Lq, Lk))
    else:
        raise AssertionError(base)
    return np.broadcast_to(m, (B, H, Lq, Lk))


def make_base(base):
    if base is None:
        return None
    if base[0] == "causal":
        return patterns.Causal()
    if base[0] == "window":
        return patterns.SlidingWindow(base[1], base[2])
    if base[0] == "random":
        return patterns.Random(base[1], seed=base[2])
    raise AssertionError(base)


def brute_topk(q, k, kk, base=None):
    q, k = as4d(q, k)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    cand = base_candidates(base, B, H, Lq, Lk)
    out = np.zeros((B, H, Lq, Lk), bool)
    for b in range(B):
        for h in range(H):
            keys = k[b, h // G].tolist()
            for i, x in enumerate(q[b, h].tolist()):
                c = [j for j in range(Lk) if cand[b, h, i, j]]
                c.sort(key=lambda j: (-dot(x, keys[j]), j))
                for j in c[:kk]:
                    out[b, h, i, j] = True
    return out


def brute_nsa(q, k, block, top_n, scale=None):
    q, k = as4d(q, k)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    sc = 1 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, Lq, Lk), bool)
    for b in range(B):
        for g in range(Hkv):
            keys = k[b, g].tolist()
            kbar = [mean(keys[c * block:(c + 1) * block], D) for c in range(Lk // block)]
            heads = range(g * G, (g + 1) * G)
            qs = {h: q[b, h].tolist() for h in heads}
            for i in range(Lq):
                t = i + Lk - Lq
                if t < 0:
                    continue
                ct = t // block
                visible = [c for c in range(Lk // block) if (c + 1) * block - 1 <= t]
                if G == 1:
                    imp = {c: dot(qs[g][i], kbar[c]) for c in visible}
                else:
                    imp = {c: 0.0 for c in visible}
                    for h in heads:
                        s = {c: sc * dot(qs[h][i], kbar[c]) for c in visible}
                        m = max(s.values()) if s else 0.0
                        e = {c: math.exp(s[c] - m) for c in visible}
                        z = 0.0
                        for c in visible:
                            z += e[c]
                        for c in visible:
                            imp[c] += e[c] / z
                earlier = [c for c in range(ct)]
                assert all(c in imp for c in earlier)
                earlier.sort(key=lambda c: (-imp[c], c))
                sel = {ct} | set(earlier[:top_n - 1])
                for h in heads:
                    for j in range(t + 1):
                        if j // block in sel:
                            out[b, h, i, j] = True
    return out


def brute_moba(q, k, block, top_k):
    q, k = as4d(q, k)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    nb = -(-Lk // block)
    out = np.zeros((B, H, Lq, Lk), bool)
    for b in range(B):
        for h in range(H):
            keys = k[b, h // G].tolist()
            kbar = [mean(keys[c * block:min((c + 1) * block, Lk)], D) for c in range(nb)]
            for i, x in enumerate(q[b, h].tolist()):
                t = i + Lk - Lq
                if t < 0:
                    continue
                ct = t // block
                earlier = list(range(ct))
                earlier.sort(key=lambda c: (-dot(x, kbar[c]), c))
                sel = {ct} | set(earlier[:top_k - 1])
                for j in range(t + 1):
                    if j // block in sel:
                        out[b, h, i, j] = True
    return out


# ---- inputs ---------------------------------------------------------------------------------

def dup_rows(rng, a, frac=0.4):
    """Copy some rows (axis -2) of a onto others, per (b, h)."""
    L = a.shape[-2]
    if L < 2:
        return a
    for idx in np.ndindex(a.shape[:-2]):
        for _ in range(int(frac * L) + 1):
            src, dst = rng.integers(0, L, 2)
            a[idx + (dst,)] = a[idx + (src,)]
    return a


def dup_blocks(rng, k, block):
    """Copy whole key blocks onto other blocks (optionally permuted inside), per (b, h)."""
    L = k.shape[-2]
    nb = L // block
    if nb < 2:
        return k
    for idx in np.ndindex(k.shape[:-2]):
        for _ in range(nb // 2 + 1):
            src, dst = rng.integers(0, nb, 2)
            rows = k[idx][src * block:(src + 1) * block].copy()
            if rng.random() < 0.5:
                rows = rows[rng.permutation(block)]
            k[idx + (slice(dst * block, (dst + 1) * block),)] = rows
    return k


def zero_some_rows(rng, a, p=0.15):
    hit = rng.random(a.shape[:-1]) < p
    a[hit] = 0
    return a


def inputs(rng, kind, B, H, Hkv, Lq, Lk, D):
    if kind == "grid":
        return grid(rng, (B, H, Lq, D)), grid(rng, (B, Hkv, Lk, D))
    return rng.standard_normal((B, H, Lq, D)), rng.standard_normal((B, Hkv, Lk, D))


def shapes(rng, lq_ne_lk=True, max_l=16, max_d=6):
    Hkv = int(rng.integers(1, 3))
    H = Hkv * int(rng.integers(1, 3))
    B = int(rng.integers(1, 3))
    Lq = int(rng.integers(1, max_l + 1))
    Lk = int(rng.integers(1, max_l + 1)) if lq_ne_lk else Lq
    D = int(rng.integers(1, max_d + 1))
    return B, H, Hkv, Lq, Lk, D


def check(p, q, k, expected, heads=None):
    m = p.mask(q.shape[-2], expected.shape[-1], heads=heads, q=q, k=k)
    assert isinstance(m, Mask)
    dense = m.to_dense()
    assert dense.shape == expected.shape, (p, dense.shape, expected.shape)
    np.testing.assert_array_equal(dense, expected, err_msg=repr(p))
    return m


KINDS = ["grid", "float"]


# ---- lsh -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_lsh_matches_brute_force(kind):
    rng = np.random.default_rng(101 if kind == "grid" else 102)
    seen = set()
    for trial in range(48):
        shared = trial % 2 == 0
        B, H, Hkv, Lq, Lk, D = shapes(rng, lq_ne_lk=not shared, max_l=14)
        buckets = int(rng.choice([2, 4, 6, 8]))
        hashes = int(rng.integers(1, 4))
        chunk = None
        if shared and rng.random() < 0.7:
            chunk = int(rng.integers(1, hashes * Lq + 3))
        causal = bool(rng.random() < 0.5)
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        q, k = inputs(rng, kind, B, H, Hkv, Lq, Lk, D)
        if kind == "grid":
            dup_rows(rng, q)
            zero_some_rows(rng, q)
            dup_rows(rng, k)
        p = patterns.Lsh(buckets, hashes=hashes, chunk=chunk, shared_qk=shared,
                         causal=causal, seed=seed)
        exp = brute_lsh(q, k, buckets, hashes, chunk, shared, causal, seed)
        check(p, q, k, exp)
        check(p, q, k, exp, heads=H)
        if shared:      # k is not read
            check(p, q, None, exp)
            if chunk is not None and (hashes * Lq) % chunk:
                seen.add("ragged-chunk")
            if chunk is not None and -(-hashes * Lq // chunk) >= 3:
                seen.add("cyclic")
            diag = np.eye(Lq, dtype=bool)
            if ((exp.sum(-1) == 1) & (exp & diag).any(-1)).any() and Lq > 1:
                seen.add("self-alone")
        seen.add((shared, chunk is None, causal, hashes > 1))
    assert {"ragged-chunk", "cyclic", "self-alone"} <= seen
    assert len(seen) >= 12


def test_lsh_2d_inputs_and_named_cases():
    rng = np.random.default_rng(7)
    for (L, D, kw) in [(12, 4, dict(buckets=4)),
                       (12, 4, dict(buckets=4, hashes=2, chunk=5)),
                       (9, 3, dict(buckets=6, hashes=3, chunk=4, causal=True, seed=5)),
                       (8, 2, dict(buckets=2, shared_qk=False, causal=True, seed=9))]:
        q = grid(rng, (L, D))
        k = grid(rng, (L + 3, D)) if not kw.get("shared_qk", True) else None
        lk = L + 3 if k is not None else L
        p = patterns.Lsh(**kw)
        m = p.mask(L, lk, q=q, k=k)
        assert m.shape == (L, lk)
        args = dict(hashes=1, chunk=None, shared_qk=True, causal=False, seed=0)
        args.update(kw)
        exp = brute_lsh(q, k, args.pop("buckets"), **args)[0, 0]
        np.testing.assert_array_equal(m.to_dense(), exp)


def test_lsh_self_rule_and_single_chunk():
    """A query alone in its bucket attends only itself; one chunk covers everything."""
    q = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    for seed in range(6):
        p = patterns.Lsh(8, seed=seed)
        d = p.mask(4, 4, q=q).to_dense()
        np.testing.assert_array_equal(d, brute_lsh(q, None, 8, seed=seed)[0, 0])
        # rows 0, 1, 3 are the same vector: each sees the other two, never itself
        for i in (0, 1, 3):
            assert not d[i, i] and d[i, [x for x in (0, 1, 3) if x != i]].all()
        # row 2 (the opposite vector) is in another bucket, alone: it attends itself only
        np.testing.assert_array_equal(d[2], [False, False, True, False])
    # causal: row 0 has no other key, keeps itself
    d = patterns.Lsh(2, causal=True).mask(4, 4, q=q).to_dense()
    assert d[0].tolist() == [True, False, False, False]
    # chunk >= hashes * L: one chunk, which is its own previous chunk: every other key
    d = patterns.Lsh(4, hashes=2, chunk=8, seed=3).mask(4, 4, q=q).to_dense()
    np.testing.assert_array_equal(d, ~np.eye(4, dtype=bool))


def test_lsh_exact_hash_ties_pin_the_rotations():
    """With buckets = 4 and D = 2, x = [c_1, -c_0] for c = R[:, 0] + R[:, 1] has
    x R = [p, -p] exactly (the entries of R are multiples of 2**-15, so every product and
    sum is exact): concat(x R, -x R) = [p, -p, -p, p] ties between two buckets, t and
    2 + (1 - t), and the lowest index wins. Whether the tie is exact depends on the exact
    entries of R, so a rotation that is off by even a constant breaks it."""
    rng = np.random.default_rng(12)
    checked = 0
    for seed in range(24):
        R = lsh_rotation(seed, 0, 0, 2, 4)
        x = [R[1][0] + R[1][1], -(R[0][0] + R[0][1])]
        p = dot(x, [R[0][0], R[1][0]])
        assert p == -dot(x, [R[0][1], R[1][1]])
        low = 0 if p > 0 else 1
        assert lsh_bucket(x, R) == low
        # partners: slightly off x, one in each of the two tied buckets
        offs = [[e * 0.01 * s, e * 0.01 * (1 - s)] for e in (1, -1) for s in (0, 1)]
        near = {lsh_bucket([x[0] + o[0], x[1] + o[1]], R): o for o in offs}
        high = 3 - low
        if low not in near or high not in near:
            continue
        pts = [x, [x[0] + near[low][0], x[1] + near[low][1]], [x[0] + near[high][0], x[1] + near[high][1]]]
        pts += rng.standard_normal((5, 2)).tolist()
        q = np.array(pts)
        d = patterns.Lsh(4, seed=seed).mask(8, 8, q=q).to_dense()
        np.testing.assert_array_equal(d, brute_lsh(q, None, 4, seed=seed)[0, 0])
        assert d[0, 1] and not d[0, 2]
        checked += 1
    assert checked >= 8


# ---- routing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_routing_matches_brute_force(kind):
    rng = np.random.default_rng(201 if kind == "grid" else 202)
    seen = set()
    for trial in range(40):
        B, H, Hkv, Lq, Lk, D = shapes(rng, max_l=12, max_d=5)
        n = Lq + Lk
        clusters = n if trial % 5 == 0 else int(rng.integers(1, n + 1))
        iterations = int(rng.choice([0, 1, 2, 5, 10]))
        causal = bool(rng.random() < 0.5)
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        q, k = inputs(rng, kind, B, H, Hkv, Lq, Lk, D)
        if kind == "grid":
            dup_rows(rng, q)
            dup_rows(rng, k)
            zero_some_rows(rng, q)
            zero_some_rows(rng, k)
            # a key in the direction of a query (scaled by 2: the same normalised point)
            k[:, :, 0, :] = 2 * q[:, ::H // Hkv, 0, :]
        p = patterns.Routing(clusters, iterations=iterations, causal=causal, seed=seed)
        exp = brute_routing(q, k, clusters, iterations, causal, seed)
        check(p, q, k, exp)
        seen.add((iterations == 0, causal, clusters == n))
    assert len(seen) >= 6


def test_routing_2d_inputs():
    rng = np.random.default_rng(3)
    for lq, lk, kw in [(6, 9, dict(clusters=3)), (7, 7, dict(clusters=14, iterations=0, causal=True)),
                       (10, 4, dict(clusters=2, iterations=3, causal=True, seed=17))]:
        q, k = grid(rng, (lq, 3)), grid(rng, (lk, 3))
        m = patterns.Routing(**kw).mask(lq, lk, q=q, k=k)
        assert m.shape == (lq, lk)
        args = dict(iterations=10, causal=False, seed=0)
        args.update(kw)
        np.testing.assert_array_equal(m.to_dense(), brute_routing(q, k, args.pop("clusters"), **args)[0, 0])


def test_routing_clusters_equal_points_iteration0_is_exact_copies():
    """clusters = Lq + Lk with 0 iterations: every point is its own centroid, so only
    points of the same direction share a cluster (the lowest centroid wins the tie)."""
    q = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    k = np.array([[0.0, 3.0], [-1.0, 0.0], [4.0, 0.0]])
    d = patterns.Routing(6, iterations=0).mask(3, 3, q=q, k=k).to_dense()
    exp = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 1]], bool)
    np.testing.assert_array_equal(d, exp)
    np.testing.assert_array_equal(d, brute_routing(q, k, 6, 0)[0, 0])


# ---- topk ------------------------------------------------------------------------------------------

BASES = [None, ("causal",), ("window", 3, 1), ("window", 0, 2), ("random", 2, 1), ("random", 5, 4)]


@pytest.mark.parametrize("kind", KINDS)
def test_topk_matches_brute_force(kind):
    rng = np.random.default_rng(301 if kind == "grid" else 302)
    seen = set()
    for trial in range(60):
        B, H, Hkv, Lq, Lk, D = shapes(rng, max_l=16)
        base = BASES[trial % len(BASES)]
        kk = int(rng.integers(0, Lk + 2))
        q, k = inputs(rng, kind, B, H, Hkv, Lq, Lk, D)
        if kind == "grid":
            dup_rows(rng, k, 0.6)
            zero_some_rows(rng, q)
        p = patterns.TopK(kk, base=make_base(base))
        exp = brute_topk(q, k, kk, base)
        check(p, q, k, exp, heads=H)          # heads=H: a per-head base draws head h
        if base is None or base[0] != "random":
            check(p, q, k, exp)
        cand = base_candidates(base, B, H, Lq, Lk).sum(-1)
        if (cand < kk).any():
            seen.add("fewer-than-k")
        seen.add(base[0] if base else None)
    assert "fewer-than-k" in seen and len(seen) == 5


def test_topk_ties_go_to_the_lower_key():
    q = np.array([[1.0, 0.0], [0.0, 0.0]])
    k = np.array([[0.5, 1.0], [1.0, 0.0], [1.0, 3.0], [0.25, 0.0], [1.0, -2.0]])
    d = patterns.TopK(2).mask(2, 5, q=q, k=k).to_dense()
    # row 0: scores .5, 1, 1, .25, 1 -> keys 1 and 2; row 1: all 0 -> keys 0 and 1
    assert d.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    np.testing.assert_array_equal(d, brute_topk(q, k, 2)[0, 0])
    # k = 0 keeps nothing, k >= candidates keeps them all
    assert patterns.TopK(0).mask(2, 5, q=q, k=k).nnz == 0
    d = patterns.TopK(3, base=patterns.Causal()).mask(2, 5, q=q, k=k).to_dense()
    np.testing.assert_array_equal(d, brute_topk(q, k, 3, ("causal",))[0, 0])
    assert d[0].sum() == 3 and d[1].sum() == 3


def test_topk_content_base_and_composites():
    """A content-dependent base (topk of topk) and composites pass q and k on."""
    rng = np.random.default_rng(5)
    q, k = grid(rng, (2, 4, 9, 3)), grid(rng, (2, 2, 11, 3))
    inner = patterns.TopK(6, base=patterns.Causal())
    outer = patterns.TopK(2, base=inner)
    d = outer.mask(9, 11, q=q, k=k).to_dense()
    cand = brute_topk(q, k, 6, ("causal",))
    exp = np.zeros_like(cand)
    G = 2
    for b, h, i in np.ndindex(2, 4, 9):
        c = [j for j in range(11) if cand[b, h, i, j]]
        c.sort(key=lambda j: (-dot(q[b, h, i].tolist(), k[b, h // G, j].tolist()), j))
        exp[b, h, i, c[:2]] = True
    np.testing.assert_array_equal(d, exp)
    u = (patterns.TopK(1) | patterns.SlidingWindow(1, 0)).mask(9, 11, q=q, k=k).to_dense()
    win = base_candidates(("window", 1, 0), 2, 4, 9, 11)
    np.testing.assert_array_equal(u, brute_topk(q, k, 1) | win)
    base = patterns.Causal() & patterns.SlidingWindow(4, 0)
    d = patterns.TopK(3, base=base).mask(9, 11, q=q, k=k).to_dense()
    np.testing.assert_array_equal(d, brute_topk(q, k, 3, ("window", 4, 0)))


# ---- nsa_select ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_nsa_select_matches_brute_force(kind):
    rng = np.random.default_rng(401 if kind == "grid" else 402)
    seen = set()
    for trial in range(50):
        B, H, Hkv, Lq, Lk, D = shapes(rng, max_l=20)
        if trial % 4 == 0:
            Lq = Lk + int(rng.integers(1, 5))           # t < 0 rows
        block = int(rng.choice([1, 2, 3, 4, 5]) if kind == "float" else rng.choice([1, 2, 4]))
        top_n = int(rng.choice([1, 1, 2, 3, 4]))
        scale = None if rng.random() < 0.5 else float(rng.choice([0.1, 0.7, 3.0]))
        q, k = inputs(rng, kind, B, H, Hkv, Lq, Lk, D)
        if kind == "grid":
            dup_blocks(rng, k, block)
            zero_some_rows(rng, q, 0.1)
        p = patterns.NsaSelect(block, top_n, scale=scale)
        exp = brute_nsa(q, k, block, top_n, scale)
        check(p, q, k, exp)
        seen.add((H > Hkv, top_n == 1, Lq > Lk))
    assert len(seen) >= 7


def test_nsa_select_2d_and_examples():
    # block 2, Lk = 8: key blocks 0..3; query at t = 7 (the last) sees all four compressed
    q = np.array([[1.0, 0.0]])
    k = np.array([[0, 0], [0, 0], [3, 0], [3, 0], [1, 0], [1, 0], [2, 0], [2, 0]], float)
    d = patterns.NsaSelect(2, 2).mask(1, 8, q=q, k=k).to_dense()
    assert d.astype(int).tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]       # current block 3 + block 1
    d = patterns.NsaSelect(2, 1).mask(1, 8, q=q, k=k).to_dense()
    assert d.astype(int).tolist() == [[0, 0, 0, 0, 0, 0, 1, 1]]       # top_n = 1: current only
    d = patterns.NsaSelect(2, 3).mask(1, 8, q=q, k=k).to_dense()
    assert d.astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    # Lq > Lk: the first Lq - Lk rows (t < 0) are empty
    q2 = np.ones((11, 2))
    d = patterns.NsaSelect(2, 2).mask(11, 8, q=q2, k=k).to_dense()
    assert not d[:3].any() and d[3:].any()
    np.testing.assert_array_equal(d, brute_nsa(q2, k, 2, 2)[0, 0])


def test_nsa_select_scale_matters_only_for_grouped_heads():
    # block 1, Lk = 4, one query at t = 3: earlier blocks 0, 1, 2, pick one (top_n = 2)
    k = np.array([[[[1.0, 0.0], [0.0, 1.0], [0.6, 0.6], [0.0, 0.0]]]])       # (1, 1, 4, 2)
    q = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])                              # (1, 2, 1, 2)
    grouped = {}
    for scale in (0.05, None, 100.0):
        p = patterns.NsaSelect(1, 2, scale=scale)
        d = p.mask(1, 4, q=q, k=k).to_dense()
        np.testing.assert_array_equal(d, brute_nsa(q, k, 1, 2, scale))
        grouped[scale] = d
        # one head per group (H = Hkv = 2): each head by its own scores, whatever the scale
        k2 = np.concatenate([k, k], axis=1)
        d2 = p.mask(1, 4, q=q, k=k2).to_dense()
        assert d2[0, 0, 0].astype(int).tolist() == [1, 0, 0, 1]
        assert d2[0, 1, 0].astype(int).tolist() == [0, 1, 0, 1]
    # small scale: importance ~ the sum of the scores: block 2 (1.2 > 1); large scale: the
    # probabilities saturate, blocks 0 and 1 tie at ~1 and block 0 wins
    assert grouped[0.05][0, 0, 0].astype(int).tolist() == [0, 0, 1, 1]
    assert grouped[100.0][0, 0, 0].astype(int).tolist() == [1, 0, 0, 1]
    for d in grouped.values():           # the group selects together
        np.testing.assert_array_equal(d[0, 0], d[0, 1])


# ---- moba -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_moba_matches_brute_force(kind):
    rng = np.random.default_rng(501 if kind == "grid" else 502)
    seen = set()
    for trial in range(50):
        B, H, Hkv, Lq, Lk, D = shapes(rng, max_l=20)
        if trial % 4 == 0:
            Lq = Lk + int(rng.integers(1, 5))
        block = int(rng.choice([1, 2, 3, 4, 5, 6]) if kind == "float" else rng.choice([1, 2, 4]))
        top_k = int(rng.choice([1, 1, 2, 3, 4]))
        q, k = inputs(rng, kind, B, H, Hkv, Lq, Lk, D)
        if kind == "grid":
            dup_blocks(rng, k, block)
            zero_some_rows(rng, q, 0.1)
        p = patterns.Moba(block, top_k)
        exp = brute_moba(q, k, block, top_k)
        check(p, q, k, exp)
        seen.add((top_k == 1, Lk % block != 0, Lq > Lk, H > Hkv))
    assert len(seen) >= 9


def test_moba_examples():
    # block 2, Lk = 7: blocks {0,1} {2,3} {4,5} {6} (the last one short)
    k = np.array([[1, 0], [1, 0], [3, 0], [1, 0], [2, 0], [2, 0], [-9, 0]], float)
    q = np.array([[1.0, 0.0]] * 7)
    d = patterns.Moba(2, 2).mask(7, 7, q=q, k=k).to_dense()
    # gates: block means 1, 2, 2 (a tie between blocks 1 and 2: block 1 wins)
    exp = np.zeros((7, 7), bool)
    for i, sel in enumerate([{0}, {0}, {0, 1}, {0, 1}, {1, 2}, {1, 2}, {1, 3}]):
        for j in range(i + 1):
            exp[i, j] = j // 2 in sel
    np.testing.assert_array_equal(d, exp)
    np.testing.assert_array_equal(d, brute_moba(q, k, 2, 2)[0, 0])
    # top_k = 1: the causal part of the current block only
    d = patterns.Moba(2, 1).mask(7, 7, q=q, k=k).to_dense()
    np.testing.assert_array_equal(d, brute_moba(q, k, 2, 1)[0, 0])
    assert d[6].astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1]
    # Lq > Lk: the t < 0 rows are empty
    # (block 3: means 5/3, 5/3, -9; the first two tie exactly and block 0 wins)
    d = patterns.Moba(3, 2).mask(9, 7, q=np.ones((9, 2)), k=k).to_dense()
    exp = np.zeros((9, 7), bool)
    for i in range(2, 9):
        exp[i, :i - 1] = True
    exp[8] = [1, 1, 1, 0, 0, 0, 1]
    np.testing.assert_array_equal(d, exp)
    np.testing.assert_array_equal(d, brute_moba(np.ones((9, 2)), k, 3, 2)[0, 0])


# ---- gradients ----------------------------------------------------------------------------------------

GRAD_CASES = [
    ("lsh-shared", lambda: patterns.Lsh(4, hashes=2, chunk=5, causal=True, seed=3), 10, 10, True),
    ("lsh-qk", lambda: patterns.Lsh(4, hashes=2, shared_qk=False, seed=4), 8, 11, False),
    ("routing", lambda: patterns.Routing(3, iterations=3, causal=True, seed=1), 9, 9, False),
    ("topk", lambda: patterns.TopK(3, base=patterns.Causal()), 8, 10, False),
    ("nsa", lambda: patterns.NsaSelect(2, 2), 8, 12, False),
    ("moba", lambda: patterns.Moba(3, 2), 8, 12, False),
]


def _loss(q, k, v, dout, m):
    return float((dout * refattn.forward(q, k, v, m).out).sum())


@pytest.mark.parametrize("name,make,lq,lk,qk_shared", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradient_is_that_of_the_realized_mask(name, make, lq, lk, qk_shared):
    p = make()
    rng = np.random.default_rng(sum(map(ord, name)) + 11)
    B, H, Hkv, D = 1, 4, 2, 4
    q = rng.standard_normal((B, H, lq, D))
    k = rng.standard_normal((B, Hkv, lk, D))
    v = rng.standard_normal((B, Hkv, lk, D))
    dout = rng.standard_normal((B, H, lq, D))
    m0 = p.mask(lq, lk, q=q, k=k)
    assert 0 < m0.nnz < B * H * lq * lk
    r = refattn.forward(q, k, v, m0)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m0)
    eps = 1e-6
    picks = [(x, tuple(int(rng.integers(0, s)) for s in x.shape)) for x in (q, k) for _ in range(6)]
    checked = 0
    for x, idx in picks:
        is_q = x is q
        vals = []
        for sgn in (1, -1):
            xp = x.copy()
            xp[idx] += sgn * eps
            qq, kk = (xp, k) if is_q else (q, xp)
            mp = p.mask(lq, lk, q=qq, k=kk)
            np.testing.assert_array_equal(mp.to_dense(), m0.to_dense())    # locally constant
            vals.append(_loss(qq, kk, v, dout, mp))
        fd = (vals[0] - vals[1]) / (2 * eps)
        an = (g.dq if is_q else g.dk)[idx]
        np.testing.assert_allclose(fd, an, rtol=1e-5, atol=1e-7, err_msg=f"{name} {'q' if is_q else 'k'}{idx}")
        checked += abs(an) > 1e-6
    assert checked >= 6


def test_gradient_ignores_the_selection_at_a_tie():
    """Two keys nearly tied for the second place of topk(2): a perturbation of q of 1e-6
    flips the choice, the whole function jumps, and refattn's gradient is that of the
    realized mask (equal to the one-sided derivative on the side that keeps it)."""
    q = np.array([[[[1.0, 1.0]]]])
    k = np.array([[[[2.0, 2.0], [0.5, 0.2], [0.2, 0.5 + 1e-9]]]])    # key 0 top, 2 just above 1
    v = np.array([[[[1.0, -1.0], [3.0, 0.0], [-2.0, 4.0]]]])
    dout = np.array([[[[1.0, 0.5]]]])
    p = patterns.TopK(2)
    m0 = p.mask(1, 3, q=q, k=k)
    assert m0.to_dense()[0, 0, 0].tolist() == [True, False, True]
    r = refattn.forward(q, k, v, m0)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m0)
    eps = 1e-6
    qp, qm = q.copy(), q.copy()
    qp[0, 0, 0, 0] += eps           # favours key 1 (0.5 > 0.2): the selection flips
    qm[0, 0, 0, 0] -= eps           # keeps key 2
    mp, mm = p.mask(1, 3, q=qp, k=k), p.mask(1, 3, q=qm, k=k)
    assert mp.to_dense()[0, 0, 0].tolist() == [True, True, False]
    assert mm == m0
    l0, lp, lm = (_loss(x, k, v, dout, m) for x, m in ((q, m0), (qp, mp), (qm, mm)))
    central = (lp - lm) / (2 * eps)
    left = (l0 - lm) / eps
    assert abs(lp - l0) > 0.1                                     # a jump, not a slope
    assert abs(central - g.dq[0, 0, 0, 0]) > 1e4
    np.testing.assert_allclose(left, g.dq[0, 0, 0, 0], rtol=1e-4, atol=1e-6)
    assert abs(g.dq[0, 0, 0, 0]) > 1e-3


# ---- serialization -----------------------------------------------------------------------------------

SERIAL = [
    (getattr(patterns, "Lsh", None), "lsh",
     dict(buckets=6, hashes=3, chunk=7, shared_qk=True, causal=True, seed=2**64 - 5)),
    (getattr(patterns, "Lsh", None), "lsh",
     dict(buckets=2, hashes=1, chunk=None, shared_qk=False, causal=False, seed=0)),
    (getattr(patterns, "Routing", None), "routing",
     dict(clusters=5, iterations=0, causal=True, seed=123456789)),
    (getattr(patterns, "TopK", None), "topk", dict(k=4, base=None)),
    (getattr(patterns, "NsaSelect", None), "nsa_select", dict(block=16, top_n=3, scale=0.25)),
    (getattr(patterns, "NsaSelect", None), "nsa_select", dict(block=4, top_n=1, scale=None)),
    (getattr(patterns, "Moba", None), "moba", dict(block=8, top_k=2)),
]


@pytest.mark.parametrize("cls,name,params", SERIAL, ids=[f"{s[1]}-{i}" for i, s in enumerate(SERIAL)])
def test_to_dict_round_trip(cls, name, params):
    p = cls(**params)
    d = p.to_dict()
    assert d["name"] == name
    for key, val in params.items():
        if val is None:
            assert d.get(key) is None
        else:
            assert d[key] == val and type(d[key]) is type(val), (key, d)
    assert patterns.from_dict(d) == p
    assert patterns.get(name, **params) == p
    assert name in patterns.names()
    assert p.content_dependent is True


@pytest.mark.parametrize("base", [patterns.Causal(), patterns.SlidingWindow(3, 1),
                                  patterns.Causal() & patterns.SlidingWindow(4, 0),
                                  patterns.Random(2, seed=1)],
                         ids=["causal", "window", "composite", "random"])
def test_topk_nested_base_round_trip(base):
    p = patterns.TopK(3, base=base)
    d = p.to_dict()
    assert d == {"name": "topk", "k": 3, "base": base.to_dict()}
    back = patterns.from_dict(d)
    assert back == p and back.base == base
    inner = patterns.TopK(2, base=p)
    assert patterns.from_dict(inner.to_dict()) == inner
    assert inner.to_dict()["base"]["base"] == base.to_dict()


def test_seed_is_part_of_equality():
    assert patterns.Lsh(4, seed=1) != patterns.Lsh(4, seed=2)
    assert patterns.Routing(3, seed=1) != patterns.Routing(3, seed=2)
    assert patterns.from_dict(patterns.Lsh(4, seed=2).to_dict()).seed == 2


# ---- determinism ---------------------------------------------------------------------------------------

ALL = [
    lambda seed: patterns.Lsh(4, hashes=2, seed=seed),
    lambda seed: patterns.Lsh(6, hashes=2, chunk=5, causal=True, seed=seed),
    lambda seed: patterns.Lsh(4, shared_qk=False, seed=seed),
    lambda seed: patterns.Routing(3, iterations=2, seed=seed),
    lambda seed: patterns.TopK(3),
    lambda seed: patterns.NsaSelect(2, 2),
    lambda seed: patterns.Moba(3, 2),
]


@pytest.mark.parametrize("make", ALL, ids=["lsh", "lsh-chunk", "lsh-qk", "routing", "topk", "nsa", "moba"])
def test_determinism_and_dtypes(make):
    rng = np.random.default_rng(9)
    q, k = grid(rng, (2, 4, 12, 5)), grid(rng, (2, 2, 12, 5))
    p = make(7)
    m = p.mask(12, 12, q=q, k=k)
    assert make(7).mask(12, 12, q=q.copy(), k=k.copy()) == m
    assert p.mask(12, 12, q=q.astype(np.float32), k=k.astype(np.float32)) == m
    qi, ki = np.round(q * 4).astype(np.int32), np.round(k * 4).astype(np.int64)
    assert p.mask(12, 12, q=qi, k=ki) == p.mask(12, 12, q=qi.astype(np.float64), k=ki.astype(np.float64))


@pytest.mark.parametrize("make", ALL[:4], ids=["lsh", "lsh-chunk", "lsh-qk", "routing"])
def test_seed_changes_the_mask(make):
    rng = np.random.default_rng(10)
    q, k = rng.standard_normal((1, 2, 16, 4)), rng.standard_normal((1, 2, 16, 4))
    masks = [make(s).mask(16, 16, q=q, k=k) for s in range(4)]
    assert any(m != masks[0] for m in masks[1:])


# ---- validation ------------------------------------------------------------------------------------------

CONTENT = {
    "lsh": lambda: patterns.Lsh(4),
    "lsh-qk": lambda: patterns.Lsh(4, shared_qk=False),
    "routing": lambda: patterns.Routing(2),
    "topk": lambda: patterns.TopK(2),
    "nsa": lambda: patterns.NsaSelect(2, 2),
    "moba": lambda: patterns.Moba(2, 2),
}


@pytest.mark.parametrize("name", list(CONTENT))
def test_content_patterns_validate_their_inputs(name):
    p = CONTENT[name]()
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 4, 6, 3)), rng.standard_normal((1, 2, 6, 3))
    p.mask(6, 6, q=q, k=k)                                   # valid
    p.mask(6, 6, heads=4, q=q, k=k)
    bad = [
        dict(),                                              # no q
        dict(k=k),
        dict(q=q, k=k[..., :2]),                             # D differs
        dict(q=q, k=rng.standard_normal((1, 3, 6, 3))),       # H not a multiple of Hkv
        dict(q=q[:, :, :5], k=k),                            # q length != lq
        dict(q=np.where(np.arange(3) == 1, np.nan, q), k=k),
        dict(q=np.where(np.arange(3) == 2, np.inf, q), k=k),
        dict(q=q, k=k, heads=2),
        dict(q=q, k=k, heads=8),
        dict(q=q[0, 0], k=k),                                 # 2-D q with 4-D k
        dict(q=q, k=k[:, :, :5]),                            # k length != lk
    ]
    if name != "lsh":                                         # these read k
        bad += [dict(q=q), dict(q=q, k=np.where(np.arange(3) == 0, -np.inf, k))]
    else:
        p.mask(6, 6, q=q)                                     # shared_qk lsh does not need k
        p.mask(6, 6, q=q[0, 0])
    for kw in bad:
        with pytest.raises(RefattnError):
            p.mask(6, 6, **kw)


@pytest.mark.parametrize("name", list(CONTENT))
def test_scores_that_overflow_are_an_error(name):
    """Finite inputs whose dot products overflow float64 cannot be ranked: an error, not
    a selection among infinities. Routing and lsh depend on each vector's direction only
    and scale it by a power of two first (exact), so huge and tiny inputs select as the
    unit-size ones do."""
    p = CONTENT[name]()
    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((1, 4, 6, 3)), rng.standard_normal((1, 2, 6, 3))
    if name in ("routing", "lsh", "lsh-qk"):
        for scale in (2.0**1020, 2.0**-1000):           # x . x overflows; underflows
            assert p.mask(6, 6, q=q * scale, k=k * scale) == p.mask(6, 6, q=q, k=k), scale
        return
    q, k = q * 1e300, k * 1e300
    with pytest.raises(RefattnError, match="overflows float64"):
        p.mask(6, 6, q=q, k=k)
    p.mask(6, 6, q=q / 1e300, k=k / 1e300)


BAD_PARAMS = [
    lambda: patterns.Lsh(3),
    lambda: patterns.Lsh(1),
    lambda: patterns.Lsh(0),
    lambda: patterns.Lsh(-2),
    lambda: patterns.Lsh(4, hashes=0),
    lambda: patterns.Lsh(4, chunk=0),
    lambda: patterns.Lsh(4, chunk=4, shared_qk=False),
    lambda: patterns.Lsh(True),
    lambda: patterns.Lsh(4, hashes=True),
    lambda: patterns.Lsh(4, chunk=True),
    lambda: patterns.Lsh(4.0),
    lambda: patterns.Lsh(4, seed=-1),
    lambda: patterns.Lsh(4, seed=2**64),
    lambda: patterns.Routing(0),
    lambda: patterns.Routing(True),
    lambda: patterns.Routing(2, iterations=-1),
    lambda: patterns.Routing(2, iterations=True),
    lambda: patterns.Routing(2, seed=-1),
    lambda: patterns.TopK(-1),
    lambda: patterns.TopK(True),
    lambda: patterns.TopK(2.0),
    lambda: patterns.TopK(2, base=3),
    lambda: patterns.NsaSelect(0, 2),
    lambda: patterns.NsaSelect(2, 0),
    lambda: patterns.NsaSelect(True, 2),
    lambda: patterns.NsaSelect(2, True),
    lambda: patterns.Moba(0, 2),
    lambda: patterns.Moba(2, 0),
    lambda: patterns.Moba(True, 2),
    lambda: patterns.Moba(2, True),
]


@pytest.mark.parametrize("i", range(len(BAD_PARAMS)))
def test_bad_parameters(i):
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((1, 2, 6, 3)), rng.standard_normal((1, 2, 6, 3))
    with pytest.raises(RefattnError):
        BAD_PARAMS[i]().mask(6, 6, q=q, k=k)


def test_mask_time_parameter_errors():
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, 2, 6, 3)), rng.standard_normal((1, 2, 8, 3))
    with pytest.raises(RefattnError):
        patterns.Lsh(4).mask(6, 8, q=q, k=k)                 # shared_qk needs Lq = Lk
    with pytest.raises(RefattnError):
        patterns.Routing(15).mask(6, 8, q=q, k=k)            # clusters > Lq + Lk
    patterns.Routing(14).mask(6, 8, q=q, k=k)
    patterns.Lsh(4, shared_qk=False).mask(6, 8, q=q, k=k)    # Lq != Lk is fine without sharing


def test_static_patterns_accept_and_ignore_q_k():
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 4, 6, 3)), rng.standard_normal((2, 2, 9, 3))
    for p in (patterns.Causal(), patterns.SlidingWindow(2, 1), patterns.Causal() & patterns.SlidingWindow(4, 0)):
        assert p.content_dependent is False
        assert p.mask(6, 9, q=q, k=k) == p.mask(6, 9)
        assert p.mask(6, 9, q=-q, k=2 * k) == p.mask(6, 9)
        with pytest.raises(RefattnError):
            p.mask(7, 9, q=q, k=k)
        with pytest.raises(RefattnError):
            p.mask(6, 8, q=q, k=k)
    for p in [make() for make in CONTENT.values()]:
        assert p.content_dependent is True
    assert (patterns.Causal() | patterns.TopK(2)).content_dependent is True
    assert (patterns.SlidingWindow(2, 0) - patterns.Moba(2, 1)).content_dependent is True
    assert patterns.TopK(2, base=patterns.Causal()).content_dependent is True
    assert (patterns.Causal() | patterns.SlidingWindow(1, 1)).content_dependent is False
    with pytest.raises(RefattnError):
        (patterns.Causal() | patterns.TopK(2)).mask(6, 6)


# ---- NSA's branches ---------------------------------------------------------------------------------------

def test_nsa_compress_is_block_means():
    rng = np.random.default_rng(5)
    for kind in KINDS:
        for block in (1, 2, 3, 4):
            k = grid(rng, (2, 3, 11, 4)) if kind == "grid" else rng.standard_normal((2, 3, 11, 4))
            c = patterns.nsa_compress(k, block)
            assert c.shape == (2, 3, 11 // block, 4)
            exp = np.zeros(c.shape)
            for b, h in np.ndindex(2, 3):
                rows = k[b, h].tolist()
                for cc in range(11 // block):
                    exp[b, h, cc] = mean(rows[cc * block:(cc + 1) * block], 4)
            if kind == "grid" and block in (1, 2, 4):
                np.testing.assert_array_equal(c, exp)
            else:
                np.testing.assert_allclose(c, exp, rtol=1e-15, atol=0)
    k2 = rng.standard_normal((10, 3))
    np.testing.assert_allclose(patterns.nsa_compress(k2, 3), k2[:9].reshape(3, 3, 3).mean(1), rtol=1e-15)


def test_nsa_compressed_mask_rule():
    for lq, lk, block in [(16, 16, 4), (5, 16, 4), (20, 13, 3), (7, 7, 1), (3, 10, 5), (4, 5, 4)]:
        m = patterns.nsa_compressed_mask(lq, lk, block)
        assert m.shape == (lq, lk // block)
        exp = np.zeros((lq, lk // block), bool)
        for i in range(lq):
            t = i + lk - lq
            for c in range(lk // block):
                exp[i, c] = (c + 1) * block - 1 <= t
        np.testing.assert_array_equal(m.to_dense(), exp)


def masked_softmax_attention(q, k, v, allowed, scale):
    B, H, Lq, _ = q.shape
    G = H // k.shape[1]
    out = np.zeros((B, H, Lq, v.shape[-1]))
    for b, h, i in np.ndindex(B, H, Lq):
        js = np.flatnonzero(allowed[b, h, i] if allowed.ndim == 4 else allowed[i])
        if len(js) == 0:
            continue
        s = scale * (k[b, h // G, js] @ q[b, h, i])
        w = np.exp(s - s.max())
        out[b, h, i] = (w / w.sum()) @ v[b, h // G, js]
    return out


def test_nsa_three_branches_through_attention():
    rng = np.random.default_rng(6)
    B, H, Hkv, L, D, block, top_n, W = 2, 4, 2, 24, 8, 4, 2, 6
    q, k, v = (rng.standard_normal(s) for s in ((B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, D)))
    scale = 1 / math.sqrt(D)
    # compressed branch: attention over the block means
    kc, vc = patterns.nsa_compress(k, block), patterns.nsa_compress(v, block)
    mc = patterns.nsa_compressed_mask(L, L, block)
    rc = refattn.forward(q, kc, vc, mc)
    assert rc.out.shape == (B, H, L, D) and np.isfinite(rc.out).all()
    np.testing.assert_allclose(rc.out, masked_softmax_attention(q, kc, vc, mc.to_dense(), scale),
                               rtol=1e-12, atol=1e-12)
    assert np.isneginf(rc.lse[:, :, :block - 1]).all() and np.isfinite(rc.lse[:, :, block - 1:]).all()
    # selected branch
    ms = patterns.NsaSelect(block, top_n).mask(L, L, q=q, k=k)
    sel = brute_nsa(q, k, block, top_n)
    np.testing.assert_array_equal(ms.to_dense(), sel)
    rs = refattn.forward(q, k, v, ms)
    assert rs.out.shape == (B, H, L, D) and np.isfinite(rs.out).all()
    np.testing.assert_allclose(rs.out, masked_softmax_attention(q, k, v, sel, scale), rtol=1e-12, atol=1e-12)
    # sliding branch
    mw = patterns.SlidingWindow(W - 1, 0).mask(L, L)
    rw = refattn.forward(q, k, v, mw)
    assert rw.out.shape == (B, H, L, D) and np.isfinite(rw.out).all()
    assert (mw.to_dense().sum(1) == np.minimum(np.arange(L) + 1, W)).all()
    np.testing.assert_allclose(rw.out, masked_softmax_attention(q, k, v, mw.to_dense(), scale),
                               rtol=1e-12, atol=1e-12)


# ---- the arithmetic the selections share ---------------------------------------------------------------

def test_ordered_dots_follow_the_stated_order():
    """The compiled dot products equal the spec's order to the bit: Python floats for a
    small block, NumPy's elementwise sums in increasing d for a larger one (inputs that
    are not on the grid, so that every sum rounds)."""
    from refattn.patterns.content import ordered_dots, ordered_pair_dots

    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((9, 37)), rng.standard_normal((14, 37))
    got = ordered_dots(x, y)
    want = np.array([[dot(a, b) for b in y.tolist()] for a in x.tolist()])
    assert np.array_equal(got, want)
    x, y = rng.standard_normal((300, 29)) * 3, rng.standard_normal((301, 29))
    want = np.zeros((300, 301))
    for d in range(29):
        want += x[:, d, None] * y[None, :, d]
    assert np.array_equal(ordered_dots(x, y), want)
    assert not np.array_equal(want, x @ y.T)                 # BLAS sums in another order
    rows, cols = rng.integers(0, 300, 500), rng.integers(0, 301, 500)
    assert np.array_equal(ordered_pair_dots(x, y, rows, cols), want[rows, cols])
    assert np.array_equal(ordered_dots(x[:, :0], y[:, :0]), np.zeros((300, 301)))


def test_top_of_rows_is_a_stable_sort_by_minus_score():
    from refattn.patterns._assemble import top_of_rows

    rng = np.random.default_rng(13)
    for width in (1, 2, 7, 40):
        scores = rng.integers(-3, 4, (25, width)).astype(np.float64)    # many ties
        scores[0] = 0.0
        scores[1, ::2] = -0.0                                            # -0 ties +0
        for k in range(width + 1):
            want = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1).ravel()
            assert np.array_equal(top_of_rows(scores, k), want), (width, k)
