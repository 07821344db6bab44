"""A plain byte mutator (flips, inserts, deletions, splices, interesting values) for runs without
atheris: the smoke test uses it so that CI without the ``fuzz`` extra still exercises every harness."""

from __future__ import annotations

import random

_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x17", b"\x18", b"\x19", b"\x1a", b"\x1b", b"\x1f",
                b"\x40", b"\x5f", b"\x9f", b"\xa0", b"\xbf", b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xff\xff"]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes], max_size: int = 4096) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(out))
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = rng.choice(_INTERESTING)
        elif op == 3 and out:
            del out[pos:pos + rng.randint(1, 16)]
        elif op == 4:
            del out[pos:]
        elif op == 5 and corpus:
            other = rng.choice(corpus)
            start = rng.randint(0, len(other))
            out[pos:pos] = other[start:start + rng.randint(1, 64)]
        else:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(out[:max_size])
