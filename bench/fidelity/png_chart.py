"""A plain line chart written as a PNG with the standard library only (zlib), for machines without
matplotlib: log-scaled x axis, y in [0, 1], solid lines with markers, dashed levels, a legend.
Text is drawn in capitals with a 5x7 bitmap font.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

_FONT = {  # 7 rows of 5 bits, top row first
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "%": (24, 25, 2, 4, 8, 19, 3), ".": (0, 0, 0, 0, 0, 12, 12), ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0), "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    ",": (0, 0, 0, 0, 12, 4, 8), "+": (0, 4, 4, 31, 4, 4, 0), "/": (0, 1, 2, 4, 8, 16, 0),
}
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * width * height)

    def dot(self, x: int, y: int, color, size: int = 1) -> None:
        for dy in range(size):
            for dx in range(size):
                px, py = x + dx - size // 2, y + dy - size // 2
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = 3 * (py * self.width + px)
                    self.pixels[i : i + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, size: int = 1, dash: int = 0) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color, size)

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 1) -> None:
        for n, char in enumerate(text.upper()):
            rows = _FONT.get(char, (0,) * 7)
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits >> (4 - c) & 1:
                        for sy in range(scale):
                            for sx in range(scale):
                                self.dot(x + (6 * n + c) * scale + sx, y + r * scale + sy, color)

    def save(self, path) -> None:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * self.width * y : 3 * self.width * (y + 1)])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                               + chunk(b"IEND", b""))


def _hex(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def line_chart(path, series, levels, title: str, x_label: str, y_label: str, width: int = 960, height: int = 560) -> None:
    """`series`: (name, "#rrggbb", xs, ys) drawn as lines; `levels`: (name, "#rrggbb", y) as dashed lines."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, width - 330, 50, height - 60
    xs = sorted({x for _, _, sx, _ in series for x in sx}) or [1.0, 10.0]
    lo, hi = math.log10(min(xs)) - 0.08, math.log10(max(xs)) + 0.08

    def px(x: float) -> int:
        return round(left + (math.log10(x) - lo) / (hi - lo) * (right - left))

    def py(y: float) -> int:
        return round(bottom - (y + 0.03) / 1.06 * (bottom - top))

    canvas.text(left, 15, title, scale=2)
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        canvas.line(left, py(tick), right, py(tick), GRID)
        canvas.text(left - 34, py(tick) - 3, f"{tick:.1f}")
    for x in xs:
        canvas.line(px(x), top, px(x), bottom, GRID)
        canvas.text(px(x) - 9, bottom + 8, f"{x:g}%")
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.text((left + right) // 2 - 3 * len(x_label), bottom + 28, x_label)
    canvas.text(8, top - 14, y_label)
    legend_y = top
    for name, color, level in levels:
        rgb = _hex(color)
        canvas.line(left, py(level), right, py(level), rgb, size=2, dash=6)
        canvas.line(right + 15, legend_y + 3, right + 40, legend_y + 3, rgb, size=2, dash=6)
        canvas.text(right + 46, legend_y, f"{name[:36]}: {level:.2f}", rgb)
        legend_y += 16
    for name, color, sx, sy in series:
        rgb = _hex(color)
        points = sorted(zip(sx, sy))
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(px(x0), py(y0), px(x1), py(y1), rgb, size=2)
        for x, y in points:
            canvas.dot(px(x), py(y), rgb, size=7)
        canvas.line(right + 15, legend_y + 3, right + 40, legend_y + 3, rgb, size=2)
        canvas.dot(right + 27, legend_y + 3, rgb, size=7)
        canvas.text(right + 46, legend_y, name, rgb)
        legend_y += 16
    canvas.save(path)
