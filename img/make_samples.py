"""Make the project's sample media (no network, no image library): PNGs written with zlib, and a
short animated PNG (APNG) standing in for a video clip. Deterministic: running it again gives
the same bytes, which tests/test_media_samples.py checks.

    python3 img/make_samples.py [out_dir]
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Pixel = tuple[int, int, int]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ihdr(width: int, height: int) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB


def scanlines(width: int, height: int, pixel: Callable[[int, int], Pixel]) -> bytes:
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type 0 (None) for every row
        for x in range(width):
            row.extend(pixel(x, y))
        rows.append(bytes(row))
    return zlib.compress(b"".join(rows), 9)


def png(width: int, height: int, pixel: Callable[[int, int], Pixel]) -> bytes:
    return (PNG_SIGNATURE + ihdr(width, height) + chunk(b"IDAT", scanlines(width, height, pixel))
            + chunk(b"IEND", b""))


def apng(width: int, height: int, frames: list[Callable[[int, int], Pixel]], delay_ms: int) -> bytes:
    """APNG: acTL, then per frame fcTL + IDAT (first) or fdAT (rest), sharing one sequence counter."""
    out = [PNG_SIGNATURE, ihdr(width, height), chunk(b"acTL", struct.pack(">II", len(frames), 0))]
    seq = 0
    for i, frame in enumerate(frames):
        # fcTL: seq, w, h, x, y, delay num/den, dispose op 0 (none), blend op 0 (source)
        out.append(chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, delay_ms, 1000, 0, 0)))
        seq += 1
        data = scanlines(width, height, frame)
        if i == 0:
            out.append(chunk(b"IDAT", data))
        else:
            out.append(chunk(b"fdAT", struct.pack(">I", seq) + data))
            seq += 1
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def gradient(x: int, y: int) -> Pixel:
    return (x * 2 % 256, y * 255 // 95, 160)


def checker(x: int, y: int) -> Pixel:
    return (230, 230, 230) if (x // 8 + y // 8) % 2 else (40, 60, 90)


def mandelbrot(x: int, y: int) -> Pixel:
    c = complex(-2.2 + x * 3.0 / 160, -1.1 + y * 2.2 / 120)
    z = 0j
    for n in range(40):
        z = z * z + c
        if abs(z) > 2:
            return (n * 6 % 256, n * 11 % 256, 255 - n * 5)
    return (0, 0, 0)


def clock_frame(step: int, steps: int) -> Callable[[int, int], Pixel]:
    """A clock hand sweeping around: frame ``step`` of ``steps``."""
    angle = 2 * math.pi * step / steps - math.pi / 2

    def pixel(x: int, y: int) -> Pixel:
        dx, dy = x - 32, y - 32
        r = math.hypot(dx, dy)
        if r > 30:
            return (255, 255, 255)
        if r > 28:
            return (30, 30, 30)
        # distance from the hand's line segment
        hx, hy = math.cos(angle), math.sin(angle)
        along = dx * hx + dy * hy
        across = abs(-dx * hy + dy * hx)
        if 0 <= along <= 26 and across < 1.6:
            return (200, 30, 30)
        return (250, 245, 225)

    return pixel


SAMPLES: dict[str, Callable[[], bytes]] = {
    "gradient.png": lambda: png(128, 96, gradient),
    "checker.png": lambda: png(64, 64, checker),
    "mandelbrot.png": lambda: png(160, 120, mandelbrot),
    "clock.apng": lambda: apng(64, 64, [clock_frame(i, 12) for i in range(12)], 100),
}


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, make in SAMPLES.items():
        (out_dir / name).write_bytes(make())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
