"""Drawing of one synthetic CCTV frame: camera scene, vehicle, occlusion, light and weather.

:mod:`loopline.examples.vehicles.datagen` decides what each file is (label, condition,
camera, defect) and writes it; this module only turns those choices into pixels, which keeps
the file and manifest logic readable apart from several hundred lines of geometry.

Vehicles are drawn at ``_SS`` times the size and box-filtered down, for anti-aliasing, from
one palette shared by every class, so only the silhouette tells classes apart. Every function
draws from the ``numpy.random.Generator`` it is given, in a fixed order: a frame is a pure
function of its arguments, and changing the order of the draws changes every image a seed
produces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_Point = tuple[float, float]
_SS = 2  # vehicles are drawn at twice the size and box-filtered down, for anti-aliasing
# Vehicle length in pixels in a 96 px wide frame, before depth and size jitter.
_BASE_LENGTH = {"car": 48.0, "van": 50.0, "truck": 66.0, "bus": 76.0, "motorcycle": 24.0}
# One palette for every class, so colour carries no label information.
_PALETTE = (
    (235, 235, 230), (172, 175, 180), (40, 42, 46), (96, 99, 105), (176, 34, 36),
    (32, 70, 160), (34, 92, 62), (224, 188, 42), (228, 122, 34), (200, 186, 152),
    (110, 32, 46), (92, 140, 190),
)  # fmt: skip
_TYRE, _RIM = (22, 22, 24), (150, 150, 156)
_HEAD_RGB, _TAIL_RGB = (240, 236, 200), (190, 30, 30)
_HEAD = np.array([1.0, 0.95, 0.8], dtype=np.float32)
_TAIL = np.array([1.0, 0.12, 0.08], dtype=np.float32)
_LAMP = np.array([1.0, 0.72, 0.38], dtype=np.float32)
_NIGHT_TINT = np.array([0.5, 0.68, 1.25], dtype=np.float32)
_NIGHT_FLOOR = np.array([0.01, 0.02, 0.06], dtype=np.float32)


# --- cameras -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """One fixed camera: its empty scene and what changes how vehicles look in it."""

    background: Image.Image
    tint: np.ndarray  # per-channel colour cast of this camera's sensor
    roll: float  # degrees; vehicles are rotated with the horizon
    road_top: float  # y where the carriageway starts
    lamps: tuple[_Point, ...]  # street-lamp heads, which glow at night


def make_camera(seed: int, k: int, size: tuple[int, int]) -> Camera:
    """Draw camera ``k``'s empty scene: sky, horizon, verge, a receding road with lane marks."""
    rng = np.random.default_rng([seed, 0xCA, k])
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    roll = float(rng.uniform(-3.0, 3.0))
    slope = math.tan(math.radians(roll))
    horizon, road_top = height * rng.uniform(0.16, 0.32), height * rng.uniform(0.44, 0.56)
    hy = horizon + slope * (xs - width / 2)
    sky_top = rng.uniform([95, 135, 180], [160, 180, 225])
    sky_low = np.minimum(sky_top + rng.uniform(25, 55), 245)
    t = np.clip(ys / np.maximum(hy, 1.0), 0, 1)[..., None]
    img = sky_top * (1 - t) + sky_low * t
    verge = np.array([(70, 108, 52), (132, 124, 78), (88, 100, 70)][rng.integers(3)], float)
    shade = (0.8 + 0.4 * np.clip((ys - hy) / height, 0, 1))[..., None]
    ground = (verge + rng.normal(0, 8, 3)) * shade + rng.normal(0, 7, (height, width, 3))
    img = np.where((ys >= hy)[..., None], ground, img)

    # The road is a fan of lines from a vanishing point far to one side, so lanes run
    # across the frame as a roadside camera sees them; u is 0 at the far edge, 1 near.
    side = 1 if rng.random() < 0.5 else -1
    xv = width / 2 + side * width * rng.uniform(1.5, 4.0)
    yv = horizon + slope * (xv - width / 2)
    s_top, s_bot = (road_top - yv) / (width / 2 - xv), (height * 1.08 - yv) / (width / 2 - xv)
    u = ((ys - yv) / (xs - xv) - s_top) / (s_bot - s_top)
    px = np.abs(1.0 / ((xs - xv) * (s_bot - s_top)))  # one pixel, in u units
    asphalt = rng.uniform(85, 122) + rng.normal(0, 5, 3)
    road = asphalt * (1.06 - 0.12 * u[..., None]) + rng.normal(0, 4, (height, width, 1))
    phase = np.log(np.abs(xs - xv)) * abs(width / 2 - xv) / (width * rng.uniform(0.15, 0.25))
    dashed = np.mod(phase + rng.random(), 1.0) < 0.45
    lanes = int(rng.integers(2, 5))
    marks = _stripe(u, 0.03, 0.014, px)
    for lane in range(1, lanes):
        marks = np.maximum(marks, _stripe(u, lane / lanes, 0.016, px) * dashed)
    road = road * (1 - marks[..., None]) + 228 * marks[..., None]
    rail = _stripe(u, -0.05, 0.018, px)[..., None]
    img = np.where((u >= 0)[..., None], road, img)
    img = img * (1 - rail) + rng.uniform(140, 190) * rail

    background = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(3, 9))):  # trees and buildings on the horizon
        x = rng.uniform(0, width)
        y = horizon + slope * (x - width / 2)
        w, h = rng.uniform(4, 16) * width / 96, rng.uniform(3, 10) * height / 72
        if rng.random() < 0.6:
            tree = _ints(rng.uniform([25, 50, 25], [60, 95, 55]))
            draw.ellipse((x - w / 2, y - h, x + w / 2, y + h / 3), fill=tree)
        else:
            house = _ints(rng.uniform(90, 170) + rng.normal(0, 8, 3))
            draw.rectangle((x - w / 2, y - h, x + w / 2, y + 1), fill=house)
    lamps = []
    pole = max(1, round(width / 96))
    for _ in range(int(rng.integers(1, 3))):
        x, top = rng.uniform(0.05, 0.95) * width, rng.uniform(0.04, 0.2) * height
        arm = x + side * rng.uniform(3, 6) * width / 96
        draw.line((x, road_top - 1, x, top, arm, top), fill=(60, 62, 66), width=pole)
        lamps.append((float(arm), float(top + 1)))
    tint = (1 + rng.uniform(-0.07, 0.07, 3)).astype(np.float32)
    return Camera(background, tint, roll, float(road_top), tuple(lamps))


def _stripe(u: np.ndarray, centre: float, half: float, px: np.ndarray) -> np.ndarray:
    """Anti-aliased mask of a road line at lane coordinate ``centre``."""
    return np.clip((half - np.abs(u - centre)) / px + 0.5, 0, 1).astype(np.float32)


# --- vehicles ------------------------------------------------------------------------------


class _Pen:
    """Draws in vehicle units (x from the rear, y up from the ground) on a supersampled layer."""

    def __init__(self, length: float, height: float) -> None:
        self.h = math.ceil(height) + 2
        self.image = Image.new("RGBA", ((math.ceil(length) + 2) * _SS, self.h * _SS))
        self.draw = ImageDraw.Draw(self.image)

    def xy(self, x: float, y: float) -> _Point:
        return (x + 1) * _SS, (self.h - 1 - y) * _SS

    def poly(self, points: Sequence[_Point], fill: tuple[int, ...], edge: bool = False) -> None:
        """Fill a polygon; ``edge`` outlines it, so dark paint stays visible on dark asphalt."""
        outline = _edge(fill) if edge else None
        self.draw.polygon([self.xy(x, y) for x, y in points], fill, outline, width=_SS)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, ...],
             edge: bool = False) -> None:  # fmt: skip
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill, edge)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: tuple[int, ...]) -> None:
        cx, cy = self.xy(x, y)
        self.draw.ellipse((cx - rx * _SS, cy - ry * _SS, cx + rx * _SS, cy + ry * _SS), fill=fill)

    def line(self, points: Sequence[_Point], fill: tuple[int, ...], w: float) -> None:
        self.draw.line([self.xy(x, y) for x, y in points], fill=fill, width=max(1, round(w * _SS)))

    def wheel(self, x: float, r: float, arch: tuple[int, ...] | None = None) -> None:
        if arch is not None:
            self.ellipse(x, r, r * 1.15, r * 1.15, arch)
        self.ellipse(x, r, r, r, _TYRE)
        self.ellipse(x, r, r * 0.5, r * 0.5, _RIM)


def _ints(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(values, 0, 255).astype(int).tolist()
    return r, g, b


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return _ints(np.array(_PALETTE[rng.integers(len(_PALETTE))]) + rng.normal(0, 7, 3))


def _glass(rng: np.random.Generator) -> tuple[int, int, int]:
    return _ints(rng.uniform([40, 60, 80], [120, 140, 175]))


def _scaled(colour: tuple[int, ...], k: float) -> tuple[int, int, int]:
    return _ints(np.array(colour[:3]) * k)


def _edge(colour: tuple[int, ...]) -> tuple[int, int, int]:
    """A panel-edge colour: a highlight on dark paint, a shadow line on light paint."""
    dark = sum(colour[:3]) < 300
    return _ints(np.array(colour[:3]) * 1.6 + 45) if dark else _scaled(colour, 0.6)


def _car(p: _Pen, L: float, h: float, rng: np.random.Generator) -> tuple[_Point, _Point]:
    """Low sedan: long bonnet and boot, a short glasshouse in the middle, two wheels."""
    body, glass = _colour(rng), _glass(rng)
    r, belt = L * rng.uniform(0.085, 0.1), h * rng.uniform(0.5, 0.58)
    hood, sill = belt * rng.uniform(0.8, 0.9), r * 0.7
    p.poly([(0.01 * L, sill), (0, belt * 0.9), (0.05 * L, belt), (0.7 * L, belt),
            (0.97 * L, hood), (L, hood * 0.88), (L, sill)], body, edge=True)  # fmt: skip
    ra, fa = L * rng.uniform(0.27, 0.34), L * rng.uniform(0.56, 0.64)
    rb, fb = ra - L * rng.uniform(0.09, 0.15), fa + L * rng.uniform(0.12, 0.18)
    p.poly([(rb, belt - 0.5), (ra, h), (fa, h), (fb, belt - 0.5)], body, edge=True)
    t = max(0.8, 0.03 * L)
    p.poly([(rb + 1.6 * t, belt + 0.4 * t), (ra + 0.6 * t, h - t), (fa - 0.6 * t, h - t),
            (fb - 1.6 * t, belt + 0.4 * t)], glass)  # fmt: skip
    mid = (ra + fa) / 2 + L * rng.uniform(-0.04, 0.04)
    p.rect(mid - t / 2, belt, mid + t / 2, h - t / 2, body)
    for x in (L * rng.uniform(0.15, 0.21), L * rng.uniform(0.77, 0.83)):
        p.wheel(x, r, _scaled(body, 0.45))
    p.rect(L - 0.04 * L, hood * 0.7, L, hood * 0.85, _HEAD_RGB)
    p.rect(0, belt * 0.72, 0.03 * L, belt * 0.86, _TAIL_RGB)
    return (L, hood * 0.78), (0.0, belt * 0.8)


def _van(p: _Pen, L: float, h: float, rng: np.random.Generator) -> tuple[_Point, _Point]:
    """Tall single box with a short sloped nose and a big windscreen."""
    body, glass = _colour(rng), _glass(rng)
    r, sill = L * rng.uniform(0.08, 0.095), L * 0.05
    roof_f, nose = L * rng.uniform(0.7, 0.76), L * rng.uniform(0.82, 0.88)
    hood = h * rng.uniform(0.46, 0.56)
    p.poly([(0, sill), (0, h * 0.97), (0.02 * L, h), (roof_f, h), (nose, hood),
            (L, hood * 0.9), (L, sill)], body, edge=True)  # fmt: skip
    t = max(0.8, 0.03 * L)
    p.poly([(roof_f - 0.02 * L, h - t), (roof_f + 0.3 * t, h - t), (nose - t, hood + t),
            (nose - 0.1 * L, hood + t)], glass)  # fmt: skip
    top, bottom = h - 1.6 * t, h * rng.uniform(0.6, 0.68)
    p.rect(nose - 0.27 * L, bottom, nose - 0.13 * L, top, glass)
    if rng.random() < 0.5:  # minibus: side windows instead of a panel side
        for k in range(int(rng.integers(1, 3))):
            p.rect(0.06 * L + k * 0.24 * L, bottom, 0.24 * L + k * 0.24 * L, top, glass)
    seam = L * rng.uniform(0.45, 0.58)
    p.line([(seam, sill + r), (seam, h - t)], _scaled(body, 0.6), max(0.5, 0.012 * L))
    for x in (L * rng.uniform(0.14, 0.19), L * rng.uniform(0.78, 0.83)):
        p.wheel(x, r, _scaled(body, 0.45))
    p.rect(L - 0.035 * L, hood * 0.62, L, hood * 0.78, _HEAD_RGB)
    p.rect(0, h * 0.38, 0.03 * L, h * 0.52, _TAIL_RGB)
    return (L, hood * 0.7), (0.0, h * 0.45)


def _truck(p: _Pen, L: float, h: float, rng: np.random.Generator) -> tuple[_Point, _Point]:
    """Cab in front of a long, taller cargo box; three or four wheels along the chassis."""
    cab, box, glass = _colour(rng), _colour(rng), _glass(rng)
    if rng.random() < 0.5:
        box = (226, 226, 222)
    r = L * rng.uniform(0.055, 0.068)
    cab_len, gap = L * rng.uniform(0.17, 0.23), L * 0.015
    box_len, cab_h, floor = L - cab_len - gap, h * rng.uniform(0.7, 0.84), r * 1.7
    p.rect(0.02 * L, r * 0.9, L - 0.03 * L, floor, (45, 45, 48))  # chassis
    p.rect(0, floor, box_len, h, box, edge=True)
    for k in range(1, int(rng.integers(3, 7))):
        x = box_len * k / 6 + rng.uniform(-0.01, 0.01) * L
        p.line([(x, floor), (x, h)], _scaled(box, 0.8), max(0.5, 0.008 * L))
    cx = box_len + gap
    p.poly([(cx, r * 0.9), (cx, cab_h), (L - 0.05 * L, cab_h), (L, cab_h * 0.8),
            (L, r * 0.9)], cab, edge=True)  # fmt: skip
    t = max(0.8, 0.02 * L)
    p.rect(cx + 0.35 * cab_len, cab_h * 0.6, L - t, cab_h - t, glass)
    p.wheel(L - cab_len * rng.uniform(0.4, 0.55), r)
    start = box_len * rng.uniform(0.1, 0.22)
    for k in range(int(rng.integers(2, 4))):
        p.wheel(start + k * 2.25 * r, r)
    p.rect(L - 0.025 * L, r * 1.2, L, r * 2.0, _HEAD_RGB)
    p.rect(0, floor, 0.02 * L, floor + r * 0.7, _TAIL_RGB)
    return (L, r * 1.6), (0.0, floor + r * 0.3)


def _bus(p: _Pen, L: float, h: float, rng: np.random.Generator) -> tuple[_Point, _Point]:
    """Very long, tall box with a row of equal side windows and a big windscreen."""
    body, glass = _colour(rng), _glass(rng)
    r, sill = L * rng.uniform(0.046, 0.056), L * 0.03
    box = (*p.xy(0, h), *p.xy(L, sill))
    p.draw.rounded_rectangle(box, 0.03 * L * _SS, fill=body, outline=_edge(body), width=_SS)
    if rng.random() < 0.5:
        p.rect(0, h * 0.3, L, h * 0.38, _colour(rng))
    low, high = h * rng.uniform(0.5, 0.58), h * 0.88
    count = int(rng.integers(5, 9))
    span = L * 0.8 / count
    for k in range(count):
        p.rect(0.04 * L + k * span, low, 0.04 * L + (k + 0.82) * span, high, glass)
    p.rect(0.86 * L, h * 0.12, 0.91 * L, high, _scaled(glass, 0.8))  # door
    p.poly([(0.93 * L, h * 0.35), (L, h * 0.32), (L, high), (0.93 * L, high)], glass)
    wheels = [L * rng.uniform(0.14, 0.19), L * rng.uniform(0.76, 0.8)]
    if rng.random() < 0.35:  # coach with a tag axle
        wheels.append(wheels[0] + 2.3 * r)
    for x in wheels:
        p.wheel(x, r, _scaled(body, 0.45))
    p.rect(L - 0.02 * L, h * 0.16, L, h * 0.26, _HEAD_RGB)
    p.rect(0, h * 0.2, 0.015 * L, h * 0.32, _TAIL_RGB)
    return (L, h * 0.21), (0.0, h * 0.26)


def _motorcycle(p: _Pen, L: float, h: float, rng: np.random.Generator) -> tuple[_Point, _Point]:
    """Two big spoked wheels, a thin frame and a rider leaning forward."""
    body, jacket, helmet = _colour(rng), _colour(rng), _colour(rng)
    r = L * rng.uniform(0.17, 0.21)
    rear, front = r * 1.05, L - r * 1.05
    head_x, head_y = 0.74 * L, 0.56 * L
    for x in (rear, front):
        p.ellipse(x, r, r, r, _TYRE)
        p.ellipse(x, r, r * 0.62, r * 0.62, (120, 120, 126))
        p.ellipse(x, r, r * 0.45, r * 0.45, (0, 0, 0, 0))
    p.line([(rear, r), (0.36 * L, 0.44 * L), (head_x, head_y), (front, r)], (70, 70, 74),
           max(0.7, 0.05 * L))  # fmt: skip
    p.rect(0.38 * L, 0.2 * L, 0.6 * L, 0.36 * L, (55, 55, 60))  # engine
    p.poly([(0.42 * L, 0.4 * L), (0.5 * L, 0.52 * L), (0.66 * L, 0.5 * L),
            (0.68 * L, 0.4 * L)], body)  # fmt: skip
    p.poly([(0.14 * L, 0.42 * L), (0.44 * L, 0.45 * L), (0.44 * L, 0.39 * L),
            (0.18 * L, 0.37 * L)], (30, 30, 32))  # fmt: skip
    hip, shoulder = (0.34 * L, 0.5 * L), (0.5 * L + rng.uniform(0.0, 0.08) * L, h - 0.2 * L)
    p.line([hip, shoulder], jacket, 0.13 * L)
    p.line([shoulder, (0.68 * L, 0.64 * L)], jacket, 0.06 * L)
    p.line([hip, (0.56 * L, 0.44 * L), (0.52 * L, 0.24 * L)], (40, 40, 50), 0.08 * L)
    p.ellipse(shoulder[0] + 0.05 * L, h - 0.09 * L, 0.09 * L, 0.09 * L, helmet)
    p.rect(head_x + 0.02 * L, head_y - 0.05 * L, head_x + 0.07 * L, head_y + 0.02 * L, _HEAD_RGB)
    return (head_x + 0.06 * L, head_y - 0.02 * L), (0.1 * L, 0.44 * L)


# label: (drawing function, height as a share of length, low and high)
_SHAPES = {
    "car": (_car, 0.3, 0.37),
    "van": (_van, 0.55, 0.67),
    "truck": (_truck, 0.4, 0.5),
    "bus": (_bus, 0.27, 0.33),
    "motorcycle": (_motorcycle, 1.0, 1.12),
}


def _draw_vehicle(
    label: str, length: float, rng: np.random.Generator
) -> tuple[Image.Image, _Point, _Point]:
    """Draw one vehicle facing right; return the layer and its head/tail light positions."""
    draw, lo, hi = _SHAPES[label]
    height = length * rng.uniform(lo, hi)
    pen = _Pen(length, height)
    lights = [pen.xy(*point) for point in draw(pen, length, height, rng)]
    (hx, hy), (tx, ty) = lights
    return pen.image.reduce(_SS), (hx / _SS, hy / _SS), (tx / _SS, ty / _SS)


# --- scenes --------------------------------------------------------------------------------


def render(
    label: str,
    condition: str,
    camera: Camera,
    rng: np.random.Generator,
    size: tuple[int, int],
) -> np.ndarray:
    """Render one frame as an ``(height, width, 3)`` uint8 array."""
    width, height = size
    scale = width / 96
    canvas = camera.background.copy()
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 3))):  # distant traffic on the far lanes
        x, y = rng.uniform(0, width), camera.road_top + rng.uniform(1, 7) * scale
        w, h = rng.uniform(3, 8) * scale, rng.uniform(2, 4) * scale
        draw.rectangle((x, y - h, x + w, y), fill=_colour(rng))

    ground = height * rng.uniform(0.82, 0.96)
    depth = 0.9 + 0.2 * (ground / height - 0.82) / 0.14  # nearer the camera is bigger
    length = min(_BASE_LENGTH[label] * scale * depth * rng.uniform(0.8, 1.2), 0.98 * width)
    layer, head, tail = _draw_vehicle(label, length, rng)
    facing = 1 if rng.random() < 0.5 else -1
    if facing < 0:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        head, tail = (layer.width - head[0], head[1]), (layer.width - tail[0], tail[1])
    angle = -camera.roll + float(np.clip(rng.normal(0, 2.0), -5, 5))
    before = layer.size
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    foot_x, foot_y = _turn((before[0] / 2, before[1] - 1), angle, before, layer.size)
    if layer.width < width:
        left = rng.uniform(-0.08 * layer.width, width - 0.92 * layer.width)
    else:
        left = rng.uniform(width - layer.width, 0)
    top = ground - foot_y
    shadow = Image.new("L", size, 0)
    sx, rx, ry = left + foot_x, 0.52 * length, max(1.2, 0.05 * length)
    ImageDraw.Draw(shadow).ellipse((sx - rx, ground - ry, sx + rx, ground + ry), fill=110)
    canvas.paste((0, 0, 0), None, shadow)
    canvas.paste(layer, (round(left), round(top)), layer)
    lights = [_turn(p, angle, before, layer.size) for p in (head, tail)]
    lights = [(x + left, y + top) for x, y in lights]
    _occlude(draw, rng, (left, top, left + layer.width, ground), scale, size)

    if condition in ("fog", "rain"):
        blur = rng.uniform(0.6, 1.2) if condition == "fog" else rng.uniform(0.4, 0.8)
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur * scale))
    img = np.asarray(canvas, dtype=np.float32) * (1 / 255) * camera.tint
    img = _weather(img, condition, rng, camera, lights, facing, scale)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _turn(point: _Point, angle: float, before: tuple[int, int], after: tuple[int, int]) -> _Point:
    """Where ``point`` of a layer lands after PIL's ``rotate(angle, expand=True)``."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    dx, dy = point[0] - before[0] / 2, point[1] - before[1] / 2
    return dx * c + dy * s + after[0] / 2, -dx * s + dy * c + after[1] / 2


def _occlude(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    box: tuple[float, float, float, float],
    scale: float,
    size: tuple[int, int],
) -> None:
    """Sometimes cover part of the vehicle with a pole, a sign or a nearer vehicle."""
    x0, y0, x1, ground = box
    roll = rng.random()
    if roll < 0.2:  # a pole, with a sign on it a third of the time
        x, w = rng.uniform(x0 + 0.1 * (x1 - x0), x1 - 0.1 * (x1 - x0)), rng.uniform(1.2, 3.2)
        grey = int(rng.uniform(50, 140))
        draw.rectangle((x - w * scale / 2, 0, x + w * scale / 2, ground + 3 * scale),
                       fill=(grey, grey, grey + 4))  # fmt: skip
        if roll < 0.07:
            sw, sh = rng.uniform(9, 16) * scale, rng.uniform(6, 11) * scale
            sy = rng.uniform(y0 - sh / 2, y0 + 0.3 * (ground - y0))
            colour = [(30, 80, 170), (30, 120, 60), (230, 230, 230)][rng.integers(3)]
            draw.rectangle((x - sw / 2, sy, x + sw / 2, sy + sh), colour, (235, 235, 235))
    elif roll < 0.3:  # the front or back of a nearer vehicle at the frame edge
        reach = rng.uniform(0.12, 0.22) * (x1 - x0)
        edge_top = ground - rng.uniform(0.25, 0.5) * (ground - y0)
        colour = _colour(rng)
        x_from, x_to = (-5.0, x0 + reach) if rng.random() < 0.5 else (x1 - reach, size[0] + 5.0)
        draw.rounded_rectangle((x_from, edge_top, x_to, size[1] + 5), 3 * scale, fill=colour)


def _weather(
    img: np.ndarray,
    condition: str,
    rng: np.random.Generator,
    camera: Camera,
    lights: list[_Point],
    facing: int,
    scale: float,
) -> np.ndarray:
    """Apply light and weather to a float image in [0, 1], with whole-array numpy ops."""
    shape = img.shape[:2]
    if condition == "day":
        img = img ** rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.1)
        sigma = 0.01
    elif condition == "night":  # dark and blue; lamps, headlights and tail lights glow
        s = scale
        img = img**1.1 * rng.uniform(0.26, 0.36) * _NIGHT_TINT + _NIGHT_FLOOR
        for x, y in camera.lamps:
            img += 0.3 * _glow(shape, x, y, 4 * s, 4 * s) * _LAMP
        (hx, hy), (tx, ty) = lights
        img += 0.9 * _glow(shape, hx, hy, 1.6 * s, 1.6 * s) * _HEAD
        img += 0.22 * _glow(shape, hx + facing * 7 * s, hy + 2 * s, 8 * s, 2.5 * s) * _HEAD
        img += 0.7 * _glow(shape, tx, ty, 1.3 * s, 1.3 * s) * _TAIL
        sigma = rng.uniform(0.015, 0.028)
    elif condition == "fog":  # washed out toward light grey, more so toward the horizon
        ys = np.arange(shape[0], dtype=np.float32)[:, None, None] / shape[0]
        amount = np.clip(rng.uniform(0.45, 0.62) + 0.22 * (0.5 - ys), 0, 0.9)
        fog = rng.uniform(0.76, 0.86) * np.array([1.0, 1.01, 1.03], dtype=np.float32)
        img = img * (1 - amount) + fog * amount
        sigma = 0.008
    else:  # rain: darker, greyer, bright streaks
        img = img * rng.uniform(0.58, 0.75)
        img = 0.65 * img + 0.35 * img.mean(axis=2, keepdims=True)
        streaks = Image.new("L", (shape[1], shape[0]), 0)
        draw = ImageDraw.Draw(streaks)
        tilt = math.radians(rng.uniform(-20, 20))
        count = int(rng.integers(50, 110) * scale * scale)
        x0, y0 = rng.uniform(-5, shape[1] + 5, count), rng.uniform(-5, shape[0] + 5, count)
        n = rng.uniform(4, 10, count) * scale
        ends = zip(x0, y0, x0 + n * math.sin(tilt), y0 + n * math.cos(tilt), strict=True)
        for line in ends:
            draw.line(line, fill=255)
        alpha = np.asarray(streaks, dtype=np.float32)[..., None] * (rng.uniform(0.25, 0.45) / 255)
        img = img * (1 - alpha) + 0.8 * alpha
        sigma = 0.015
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return img.astype(np.float32) + noise


def _glow(shape: tuple[int, ...], x: float, y: float, sx: float, sy: float) -> np.ndarray:
    """A Gaussian light blob of peak 1, shape ``(height, width, 1)``, as an outer product."""
    gx = np.exp(-0.5 * ((np.arange(shape[1], dtype=np.float32) - x) / sx) ** 2)
    gy = np.exp(-0.5 * ((np.arange(shape[0], dtype=np.float32) - y) / sy) ** 2)
    return np.outer(gy, gx)[..., None]
