"""refattn's seeded draw (spec/patterns.md, "The random draw") re-implemented in plain Python
integers, independently of the compiled one in refattn.patterns._draw; shared by the tests
of the drawn and the content-dependent patterns."""

M64 = (1 << 64) - 1


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def below(seed, head, row, step, bound):
    u = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ head) ^ row) ^ step)
    return ((u >> 32) * bound) >> 32


def reference_draw(seed, head, row, n, k):
    """Floyd's algorithm: k distinct values of range(n)."""
    chosen = []
    for step in range(min(k, n)):
        top = n - min(k, n) + step
        t = below(seed, head, row, step, top + 1)
        chosen.append(top if t in chosen else t)
    return sorted(chosen)
