"""Synthetic chest radiographs paired with reports that describe exactly what was drawn.

Why a phantom: the project needs an image/report corpus that can be generated anywhere, in any
amount, with no licence or privacy strings attached, and whose ground truth is known, so that a
tiny CLIP model trained for a few CPU minutes must visibly learn something (zero-shot
classification of the drawn findings rising far above chance). Realism matters less than
learnability: every finding is drawn large and contrasted enough to survive downscaling to 64x64
and a random-resized crop of scale 0.8-1.0, and report wording is drawn from a small, fixed set of
templates that always carry the category, severity, side and zone words.

Conventions
-----------
* Images are frontal (PA) radiographs displayed the radiological way: **the patient's right is
  on the image's left**. So a "right" finding is drawn in the image's left half (x < 0.5), a
  "left" finding in the image's right half, and the heart bulges towards the image's right.
* Dense tissue is bright, air is dark. The image is built as an additive attenuation map (body
  soft tissue, minus lung air, plus heart, mediastinum, spine, ribs, clavicles, vessels and the
  findings), then mapped through a random gamma/contrast, plus noise and a slight blur.
* Each lung field is split vertically into equal upper/middle/lower thirds of its height; these
  are the report's zones. Effusions are always "lower" and pneumothoraces always "upper".
* Everything is deterministic given the ``np.random.Generator`` passed in. :func:`render` takes
  exactly one draw from it and derives separate streams for anatomy, noise and each finding
  category, so rendering the same seed with and without a finding gives the same patient and
  the same noise: the pixel difference is the finding alone (the tests rely on this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "FINDINGS",
    "SEVERITIES",
    "SIDES",
    "ZONES",
    "NO_FINDING",
    "CLASS_NAMES",
    "Finding",
    "PhantomCase",
    "Lung",
    "Anatomy",
    "sample_findings",
    "sample_anatomy",
    "render",
    "render_with_anatomy",
    "write_report",
    "impression_sentence",
    "sample_case",
    "parse_report",
    "ZERO_SHOT_PROMPTS",
]

FINDINGS: tuple[str, ...] = ("opacity", "effusion", "nodule", "cardiomegaly", "pneumothorax")
SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
SIDES: tuple[str, ...] = ("left", "right")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
NO_FINDING = "no_finding"
CLASS_NAMES: tuple[str, ...] = (NO_FINDING, *FINDINGS)

# Categories whose zone is fixed by anatomy rather than sampled.
_FIXED_ZONE = {"effusion": "lower", "pneumothorax": "upper"}


# ---------------------------------------------------------------------------------------------
# Findings and cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One abnormality. Validated on construction so a bad finding fails where it is made,
    not later as a wrong picture or an unparseable report."""

    category: str
    severity: str
    side: str | None = None
    zone: str | None = None

    def __post_init__(self) -> None:
        if self.category not in FINDINGS:
            raise ValueError(f"unknown finding category {self.category!r}; expected one of {FINDINGS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")
        if self.category == "cardiomegaly":
            if self.side is not None or self.zone is not None:
                raise ValueError("cardiomegaly has no side or zone")
            return
        if self.side not in SIDES:
            raise ValueError(f"{self.category} needs a side in {SIDES}, got {self.side!r}")
        if self.zone not in ZONES:
            raise ValueError(f"{self.category} needs a zone in {ZONES}, got {self.zone!r}")
        fixed = _FIXED_ZONE.get(self.category)
        if fixed is not None and self.zone != fixed:
            raise ValueError(f"{self.category} is always in the {fixed} zone, got {self.zone!r}")

    def location(self) -> str:
        """Location string for entity records: "<side> <zone>", or "cardiac" for cardiomegaly."""
        if self.category == "cardiomegaly":
            return "cardiac"
        return f"{self.side} {self.zone}"


@dataclass
class PhantomCase:
    """One generated study: the image, its ground truth, and the report sections."""

    image: np.ndarray
    findings: list[Finding]
    findings_text: str
    impression_text: str
    view: str = "PA"

    def labels(self) -> dict[str, int]:
        """Multi-label targets over CLASS_NAMES (no_finding is 1 exactly when nothing was drawn)."""
        present = {f.category for f in self.findings}
        out = {name: int(name in present) for name in FINDINGS}
        return {NO_FINDING: int(not self.findings), **out}

    def entities(self) -> list[dict[str, str]]:
        """Structured findings, for evaluation code that wants more than the class labels."""
        return [{"category": f.category, "severity": f.severity, "location": f.location()} for f in self.findings]


def _sample_one(category: str, rng: np.random.Generator) -> Finding:
    severity = SEVERITIES[int(rng.integers(len(SEVERITIES)))]
    if category == "cardiomegaly":
        return Finding(category, severity)
    side = SIDES[int(rng.integers(len(SIDES)))]
    zone = _FIXED_ZONE.get(category) or ZONES[int(rng.integers(len(ZONES)))]
    return Finding(category, severity, side, zone)


def _conflict(a: Finding, b: Finding) -> bool:
    return a.side is not None and (a.side, a.zone) == (b.side, b.zone)


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """Draw a study's findings: 35% none, 45% one, 20% two of distinct categories.

    Two findings never share a side and zone, so each is visible on its own and the report
    never has to describe overlapping abnormalities. Categories are uniform, so each one appears
    in about (0.45 + 2 * 0.20) / 5 = 17% of studies.
    """
    u = rng.random()
    n = 0 if u < 0.35 else (1 if u < 0.80 else 2)
    cats = [FINDINGS[int(i)] for i in rng.choice(len(FINDINGS), size=n, replace=False)]
    out: list[Finding] = []
    for cat in cats:
        f = _sample_one(cat, rng)
        while any(_conflict(f, g) for g in out):
            f = _sample_one(cat, rng)
        out.append(f)
    return out


# ---------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lung:
    """A lung field in normalised image coordinates (x right, y down, both in [0, 1]).

    In the lung's own coordinates u = (x - cx) / a, v = (y - cy) / b the field spans v in
    [-1, 1]: an elliptical apex above v = 0, and below it straight walls down to a domed
    diaphragm whose sharp lateral costophrenic angle is the field's lowest point (v = 1).
    ``lateral`` is +1 when the lung's outer wall is towards larger x (the patient's left lung).
    """

    cx: float
    cy: float
    a: float
    b: float
    lateral: int

    @property
    def top(self) -> float:
        return self.cy - self.b

    @property
    def bottom(self) -> float:
        return self.cy + self.b

    def zone_box(self, zone: str) -> tuple[float, float, float, float]:
        """(x0, x1, y0, y1) of one third of the field's height."""
        i = ZONES.index(zone)
        h = 2 * self.b / 3
        return (self.cx - self.a, self.cx + self.a, self.top + i * h, self.top + (i + 1) * h)


@dataclass(frozen=True)
class Anatomy:
    """Patient geometry and densities drawn for one image (before findings change them).

    Public so tests and analysis code can find zones and the heart in the pixels.
    """

    lungs: dict[str, Lung]  # keyed by the patient's side
    heart_cx: float
    heart_cy: float
    heart_ry: float
    ctr: float  # cardiothoracic ratio of this patient's normal heart
    scale: float
    body_cx: float
    body_cy: float
    body_a: float
    body_b: float
    mediastinum_halfwidth: float
    dens_body: float
    dens_air: float
    dens_heart: float
    dens_mediastinum: float
    dens_spine: float
    dens_rib: float
    dens_clavicle: float
    dens_vessel: float
    rib_spacing: float
    rib_phase: float
    rib_curve: float
    texture_seed: int
    gamma: float
    gain: float
    offset: float
    noise_sigma: float

    @property
    def thoracic_width(self) -> float:
        """Inner thoracic width, taken from outer lung wall to outer lung wall."""
        r, l = self.lungs["right"], self.lungs["left"]
        return (l.cx + l.a) - (r.cx - r.a)

    def heart_width(self, ctr: float | None = None) -> float:
        return (self.ctr if ctr is None else ctr) * self.thoracic_width

    def zone_box(self, side: str, zone: str) -> tuple[float, float, float, float]:
        """(x0, x1, y0, y1), normalised, of the named zone of the patient's ``side`` lung."""
        return self.lungs[side].zone_box(zone)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: size, position, proportions and densities all jittered.

    The jitter stops a model from matching fixed pixel positions and grey levels, while the
    ranges stay narrow enough that every zone remains where a radiologist would look for it.
    """
    u = rng.uniform
    s = u(0.93, 1.04)
    ox, oy = u(-0.025, 0.025), u(-0.025, 0.02)
    mid = 0.5 + ox
    gap = 0.045 * s * u(0.9, 1.1)
    a_r, a_l = 0.150 * s * u(0.95, 1.05), 0.145 * s * u(0.95, 1.05)
    b_r, b_l = 0.305 * s * u(0.95, 1.05), 0.305 * s * u(0.95, 1.05)
    cy = 0.47 + oy
    right = Lung(mid - gap - a_r, cy, a_r, b_r, lateral=-1)
    left = Lung(mid + gap + a_l, cy + 0.015 * s, a_l, b_l, lateral=+1)
    return Anatomy(
        lungs={"right": right, "left": left},
        heart_cx=mid,
        heart_cy=left.cy + 0.66 * left.b,
        heart_ry=0.15 * s * u(0.93, 1.07),
        ctr=u(0.38, 0.45),
        scale=s,
        body_cx=mid,
        body_cy=0.70 + oy,
        body_a=((left.cx + left.a) - (right.cx - right.a)) / 2 + 0.09 * s * u(0.9, 1.15),
        body_b=0.64 * s,
        mediastinum_halfwidth=0.05 * s * u(0.9, 1.1),
        dens_body=u(0.50, 0.58),
        dens_air=u(0.36, 0.42),
        dens_heart=u(0.03, 0.06),
        dens_mediastinum=u(0.05, 0.09),
        dens_spine=u(0.03, 0.05),
        dens_rib=u(0.04, 0.06),
        dens_clavicle=u(0.08, 0.12),
        dens_vessel=u(0.12, 0.16),
        rib_spacing=0.07 * s * u(0.92, 1.08),
        rib_phase=u(0.0, 1.0),
        rib_curve=u(1.8, 2.4),
        texture_seed=int(rng.integers(0, 2**63 - 1)),
        gamma=u(0.85, 1.15),
        gain=u(0.88, 1.06),
        offset=u(-0.03, 0.04),
        noise_sigma=u(0.025, 0.05),
    )


# ---------------------------------------------------------------------------------------------
# Rendering helpers (vectorised over a cached float32 pixel grid; no transcendental functions
# on the full grid beyond sqrt, which keeps a 128x128 image at a couple of milliseconds)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


@lru_cache(maxsize=8)
def _half_kernel(sigma_px: float) -> tuple[float, ...]:
    r = max(1, int(np.ceil(2.5 * sigma_px)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    return tuple(float(x) for x in k[r:])


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with replicated edges, by adding shifted slices.

    Deliberately not a matrix product: a 128x128 BLAS call costs ~10x more than this when
    OpenBLAS spins up threads (and far more inside multi-worker data loaders).
    """
    k = _half_kernel(sigma_px)
    for axis in (0, 1):
        src = img if axis == 0 else img.T
        out = src * k[0]
        for d, w in enumerate(k[1:], start=1):
            out[d:] += w * src[:-d]
            out[:-d] += w * src[d:]
            out[:d] += w * src[:1]
            out[-d:] += w * src[-1:]
        img = out if axis == 0 else out.T
    return img


def _clip(x: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """np.clip without its Python-level dispatch overhead (it is called ~40 times per image)."""
    if lo is not None:
        x = np.maximum(x, lo)
    return x if hi is None else np.minimum(x, hi)


def _edge(d: np.ndarray, size: int, width_px: float = 1.0) -> np.ndarray:
    """Anti-aliased step: 1 where the signed distance ``d`` (normalised units) is positive."""
    return _clip(d * (size / width_px) + 0.5, 0.0, 1.0)


def _lung_shape(lung: Lung, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, r, sd) for a lung: local coordinates, the apex radius r (< 1 inside, meaningful
    above v = 0), and an approximate signed distance to the border (positive inside)."""
    u = (xx - lung.cx) / lung.a
    v = (yy - lung.cy) / lung.b
    r = np.sqrt(u * u + v * v)
    ul = u * lung.lateral
    vl = _clip(v, 0.0, 1.0)
    dome = 1.0 - 0.22 * (1.0 - ul * ul) - 0.04 * (1.0 - ul)  # diaphragm height, in v units
    wall_lat = 1.0 + 0.07 * vl - ul  # the lateral wall bows out towards the base
    wall_med = 1.0 - 0.1 * vl + ul  # the medial wall steps in where the heart sits
    sd_low = np.minimum(np.minimum(wall_lat, wall_med) * lung.a, (dome - v) * lung.b)
    sd = np.where(v < 0, (1.0 - r) * lung.a, sd_low)
    return u, v, r, sd


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled to ``shape``."""
    g = rng.random((cells, cells), dtype=np.float32)

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        t = (np.arange(n, dtype=np.float32) + 0.5) / n * (cells - 1)
        i0 = np.minimum(t.astype(np.int64), cells - 2)
        return i0, t - i0

    (ri, rf), (ci, cf) = axis(shape[0]), axis(shape[1])
    rows = g[ri] * (1 - rf)[:, None] + g[ri + 1] * rf[:, None]
    return rows[:, ci] * (1 - cf)[None, :] + rows[:, ci + 1] * cf[None, :]


def _segment_dist2(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """Squared distance to a line segment."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = _clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    ex, ey = xx - (x0 + t * dx), yy - (y0 + t * dy)
    return ex * ex + ey * ey


def _heart_mask(anat: Anatomy, width: float, ry: float, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Heart silhouette: a third of its width to the image's left of the midline, two thirds to
    the image's right (the patient's left), as on a real PA film."""
    rxl, rxr = 0.34 * width, 0.66 * width
    dx = xx - anat.heart_cx
    u = dx / rxr + np.minimum(dx, 0.0) * (1.0 / rxl - 1.0 / rxr)
    v = (yy - anat.heart_cy) / ry
    r = np.sqrt(u * u + v * v)
    return _edge((1.0 - r) * min(rxl, ry), size, 1.2)


_LUT_SIZE = 1024


@lru_cache(maxsize=256)
def _tone_lut(gamma: float, gain: float, offset: float) -> np.ndarray:
    """Tone curve (gamma, contrast, brightness) as a lookup table: a per-pixel power function
    would cost more than the rest of the image."""
    x = np.linspace(0.0, 1.0, _LUT_SIZE)
    y = np.clip(gain * x**gamma + offset, 0.0, 1.0)
    return (y * 255.0 + 0.5).astype(np.uint8)

# Severity tables: index 0/1/2 = mild/moderate/severe.
_CARDIO_CTR = (0.57, 0.64, 0.72)
_OPACITY_SIZE = (0.70, 0.82, 0.95)  # fraction of lung half-width and of half a zone's height
_OPACITY_DENS = (0.36, 0.44, 0.52)
_NODULE_RADIUS = (0.026, 0.030, 0.034)  # normalised, before patient scale
_EFFUSION_HEIGHT = (0.17, 0.30, 0.45)  # fraction of lung height
_PTX_DEPTH = (0.22, 0.34, 0.48)  # fraction of the apex radius

Box = tuple[slice, slice]


def _box(x0: float, x1: float, y0: float, y1: float, size: int, margin_px: int = 3) -> Box:
    """Pixel slices covering a normalised rectangle plus a margin (structures are computed only
    inside their box: most of them cover a small part of the image)."""
    r0 = min(size - 1, max(0, int(np.floor(y0 * size)) - margin_px))
    r1 = max(r0 + 1, min(size, int(np.ceil(y1 * size)) + margin_px))
    c0 = min(size - 1, max(0, int(np.floor(x0 * size)) - margin_px))
    c1 = max(c0 + 1, min(size, int(np.ceil(x1 * size)) + margin_px))
    return slice(r0, r1), slice(c0, c1)


@dataclass
class _Field:
    """One lung's shape arrays, computed inside the lung's bounding box only."""

    lung: Lung
    box: Box
    yy: np.ndarray
    xx: np.ndarray
    u: np.ndarray
    v: np.ndarray
    r: np.ndarray
    sd: np.ndarray
    mask: np.ndarray


@dataclass
class _Scene:
    """Per-image arrays shared by the finding painters."""

    anat: Anatomy
    size: int
    fields: dict[str, _Field]
    soft_tissue: np.ndarray  # 1 over heart and mediastinum, where the lungs are hidden


def _draw_opacity(f: Finding, sc: _Scene, rng: np.random.Generator) -> tuple[Box, np.ndarray]:
    fl = sc.fields[f.side]
    lung = fl.lung
    _, _, y0, y1 = lung.zone_box(f.zone)
    k = SEVERITIES.index(f.severity)
    zh = y1 - y0
    lateral_shift = rng.uniform(0.05, 0.3)
    cy = (y0 + y1) / 2 + rng.uniform(-0.08, 0.08) * zh
    if f.zone == "upper":  # the apex is narrow: keep the blob where there is lung
        cy += 0.12 * zh
    elif f.zone == "lower":  # the diaphragm dome and the heart take the zone's lower, medial part
        cy -= 0.1 * zh
        lateral_shift += 0.15
    cx = lung.cx + lung.lateral * lateral_shift * lung.a
    rx = _OPACITY_SIZE[k] * lung.a * rng.uniform(0.92, 1.08)
    ry = _OPACITY_SIZE[k] * zh / 2 * rng.uniform(0.95, 1.1)
    dx, dy = (fl.xx - cx) / rx, (fl.yy - cy) / ry
    blob = _clip(1.0 - dx * dx - dy * dy, 0.0, 1.0)
    blob = blob * blob * (3.0 - 2.0 * blob)  # smoothstep: a fluffy edge, not a rim
    mottle = 0.7 + 0.3 * _smooth_noise(rng, blob.shape, 8)
    dens = _OPACITY_DENS[k] * rng.uniform(0.92, 1.08)
    return fl.box, dens * blob * mottle * fl.mask * (1.0 - sc.soft_tissue[fl.box])


def _draw_nodule(f: Finding, sc: _Scene, rng: np.random.Generator) -> tuple[Box, np.ndarray]:
    fl = sc.fields[f.side]
    lung = fl.lung
    x0, x1, y0, y1 = lung.zone_box(f.zone)
    k = SEVERITIES.index(f.severity)
    rad = _NODULE_RADIUS[k] * sc.anat.scale * rng.uniform(0.95, 1.05)
    # Pick the centre among pixels in the zone that lie well inside the lung and clear of the
    # heart and mediastinum (a small spot over soft tissue would be hard to see).
    c = max(1, int(round(1.8 * rad * sc.size)))
    zh = y1 - y0
    zone = (fl.yy > y0 + 0.1 * zh) & (fl.yy < y1 - 0.1 * zh) & (fl.xx > x0) & (fl.xx < x1)
    ok = zone & (fl.sd > 1.5 * rad)
    soft = sc.soft_tissue[fl.box] > 0.02
    near = soft.copy()
    near[c:] |= soft[:-c]
    near[:-c] |= soft[c:]
    near[:, c:] |= soft[:, :-c]
    near[:, :-c] |= soft[:, c:]
    # Relax step by step when a big heart leaves no clear lung in the zone (left lower zone
    # with severe cardiomegaly): the spot then overlies the heart, still bright and in zone.
    for cond in (ok & ~near, ok & ~soft, ok, zone):
        cand = np.flatnonzero(cond)
        if cand.size:
            break
    if cand.size == 0:  # degenerate tiny image: anywhere in the box
        cand = np.arange(fl.yy.size)
    i = int(cand[int(rng.integers(cand.size))])
    w = fl.yy.shape[1]
    cy = float(fl.yy[i // w, 0]) + (rng.uniform() - 0.5) / sc.size
    cx = float(fl.xx[0, i % w]) + (rng.uniform() - 0.5) / sc.size
    box = _box(cx - rad, cx + rad, cy - rad, cy + rad, sc.size, 2)
    yy, xx = _grid(sc.size)
    dx, dy = xx[box] - cx, yy[box] - cy
    d2 = (dx * dx + dy * dy) / (rad * rad)
    disc = _clip((1.0 - d2) * (rad * sc.size / 1.6) + 0.5, 0.0, 1.0)
    dome = 0.75 + 0.25 * np.sqrt(_clip(1.0 - d2, 0.0, 1.0))
    return box, (0.55 * rng.uniform(0.92, 1.08)) * disc * dome


def _draw_effusion(f: Finding, sc: _Scene, rng: np.random.Generator) -> tuple[Box, np.ndarray]:
    fl = sc.fields[f.side]
    k = SEVERITIES.index(f.severity)
    h = 2.0 * (_EFFUSION_HEIGHT[k] + rng.uniform(-0.02, 0.02))  # in v units (lung height = 2)
    lat = (_clip(fl.u * fl.lung.lateral, -1.0, 1.0) + 1.0) * 0.5  # 0 medial .. 1 lateral
    meniscus = rng.uniform(0.22, 0.3) * lat * lat * lat  # rises along the lateral wall
    level = 1.0 - h - meniscus
    fill = _clip((fl.v - level) * (fl.lung.b * sc.size / 1.5) + 0.5, 0.0, 1.0)
    depth = _clip((fl.v - level) * (1.0 / h), 0.0, 1.0)
    dens = 0.40 * rng.uniform(0.95, 1.05)
    return fl.box, dens * fill * (0.85 + 0.15 * depth) * fl.mask * (1.0 - sc.soft_tissue[fl.box])


def _draw_pneumothorax(f: Finding, sc: _Scene, rng: np.random.Generator) -> tuple[Box, np.ndarray, np.ndarray]:
    """Return (box, collapsed-space mask in [0, 1], pleural line intensity in [0, 1])."""
    fl = sc.fields[f.side]
    k = SEVERITIES.index(f.severity)
    r0 = 1.0 - _PTX_DEPTH[k] * rng.uniform(0.92, 1.08)
    # Keep the air above the upper zone's lower border (v = -1/3), fading out just above it.
    vtaper = _clip((-0.36 - fl.v) * 10.0, 0.0, 1.0) * fl.mask
    t = (fl.r - r0) * (fl.lung.a * sc.size)
    region = _clip(t + 0.5, 0.0, 1.0) * vtaper
    line = _clip(1.0 - np.abs(t) * (1.0 / 1.1), 0.0, 1.0) * vtaper
    return fl.box, region, line


def render_with_anatomy(findings: list[Finding], rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, Anatomy]:
    """Render a study and also return the patient geometry it was drawn on.

    Takes exactly one draw from ``rng`` and splits it into independent streams (anatomy, noise,
    one per finding category), so the same seed yields the same patient and noise whatever
    the findings: the difference between two renders is the finding alone.
    """
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=3)]
    anat = sample_anatomy(np.random.default_rng(seeds[0]))
    yy, xx = _grid(size)
    s = anat.scale
    mid = anat.heart_cx
    lr, ll = anat.lungs["right"], anat.lungs["left"]

    # -- body ---------------------------------------------------------------------------------
    bx = (xx - anat.body_cx) * (1.0 / anat.body_a)
    by = (yy - anat.body_cy) * (1.0 / anat.body_b)
    bx2, by2 = bx * bx, by * by
    body_r = np.sqrt(np.sqrt(bx2 * bx2 + by2 * by2))  # superellipse, p = 4: square shoulders
    body = _edge((1.0 - body_r) * anat.body_a, size, 2.5)
    nb = _box(mid - 0.1, mid + 0.1, 0.0, 0.25, size)
    neck = _edge(0.075 * s - np.abs(xx[nb] - mid), size, 1.5) * _edge(0.25 - yy[nb], size, 1.0)
    body[nb] = np.maximum(body[nb], neck)
    att = (anat.dens_body * body) * (1.0 + 0.15 * _clip(1.0 - np.abs(bx), 0.0, 1.0))

    # -- lungs, heart, mediastinum -----------------------------------------------------------
    fields: dict[str, _Field] = {}
    lung_air = np.zeros_like(att)
    for side, lung in anat.lungs.items():
        box = _box(lung.cx - 1.08 * lung.a, lung.cx + 1.08 * lung.a, lung.top, lung.bottom, size)
        fy, fx = yy[box], xx[box]
        u, v, r, sd = _lung_shape(lung, fy, fx)
        mask = _edge(sd, size, 1.2)
        fields[side] = _Field(lung, box, fy, fx, u, v, r, sd, mask)
        lung_air[box] = np.maximum(lung_air[box], mask)

    cardio = next((f for f in findings if f.category == "cardiomegaly"), None)
    ctr, ry = anat.ctr, anat.heart_ry
    if cardio is not None:
        k = SEVERITIES.index(cardio.severity)
        crng = np.random.default_rng([seeds[2], FINDINGS.index("cardiomegaly")])
        ctr = _CARDIO_CTR[k] + crng.uniform(-0.012, 0.012)
        ry *= (1.04, 1.08, 1.12)[k]
    hw = anat.heart_width(ctr)
    soft = np.zeros_like(att)
    hb = _box(mid - 0.34 * hw, mid + 0.66 * hw, anat.heart_cy - ry, anat.heart_cy + ry, size)
    soft[hb] = _heart_mask(anat, hw, ry, yy[hb], xx[hb], size)
    att = att + anat.dens_heart * soft

    mw = anat.mediastinum_halfwidth
    mb = _box(mid - mw, mid + 2.5 * mw, 0.0, anat.heart_cy, size)
    my, mx = yy[mb], xx[mb]
    upper_med = _edge(mw - np.abs(mx - mid), size, 1.5) * _edge(anat.heart_cy - my, size, 1.0)
    kx, ky = mx - (mid + 0.9 * mw), my - (ll.top + 0.13 * s)
    knob = _edge(0.032 * s - np.sqrt(kx * kx + ky * ky), size)  # aortic knob
    med = np.maximum(upper_med, knob)
    att[mb] += anat.dens_mediastinum * med
    soft[mb] = np.maximum(soft[mb], med)
    att = att - anat.dens_air * lung_air * (1.0 - soft)

    sb = _box(mid - 0.04, mid + 0.04, 0.0, 1.0, size)
    sx, sy = np.abs(xx[sb] - mid), yy[sb]
    carina = lr.top + 0.2 * s
    trachea = _edge(0.018 * s - sx, size, 1.5) * _edge(carina - sy, size, 3.0) * _edge(sy - 0.04, size, 3.0)
    att[sb] += anat.dens_spine * _edge(0.03 * s - sx, size, 1.5) * body[sb] - 0.12 * trachea

    # -- bones: posterior ribs (bands along curves that fall laterally) and clavicles ------------
    rb = _box(0.0, 1.0, lr.top - 0.06, ll.bottom + 0.04, size, 0)
    ry_, rx_ = yy[rb], xx[rb]
    adx = np.abs(rx_ - mid)
    phase = (ry_ - anat.rib_curve * adx * adx + 0.25 * adx) * (1.0 / anat.rib_spacing) + anat.rib_phase
    tri = np.abs(phase - np.floor(phase) - 0.5) * 2.0  # 0 mid-rib .. 1 between ribs
    band = _clip((0.45 - tri) * 4.0, 0.0, 1.0) + 0.5 * _clip(1.0 - np.abs(tri - 0.42) * 12.0, 0.0, 1.0)
    rib_zone = _edge(anat.body_a * 0.97 - adx, size, 2.0) * _edge(adx - 0.035, size) * body[rb]
    rib_zone = rib_zone * _edge(ry_ - (lr.top - 0.05), size, 3.0) * _edge(ll.bottom + 0.03 - ry_, size, 3.0)
    att[rb] += anat.dens_rib * band * rib_zone
    clav_y = lr.top + 0.05 * s
    for sgn in (-1, 1):
        p0 = (mid + sgn * 0.04, clav_y + 0.03)
        p1 = (mid + sgn * 0.33 * s, clav_y - 0.045)
        cb = _box(min(p0[0], p1[0]) - 0.02, max(p0[0], p1[0]) + 0.02, p1[1] - 0.02, p0[1] + 0.02, size)
        d = np.sqrt(_segment_dist2(yy[cb], xx[cb], p0, p1))
        att[cb] += anat.dens_clavicle * _edge(0.014 * s - d, size)

    # -- lung markings: ridged noise (vessel-like lines) fading from each hilum outwards ------
    trng = np.random.default_rng(anat.texture_seed)
    ridge = _clip(1.0 - np.abs(_smooth_noise(trng, (size, size), 11) - 0.5) * 6.0, 0.0, 1.0)
    markings: dict[str, np.ndarray] = {}
    for side, fl in fields.items():
        lung = fl.lung
        hx, hy = lung.cx - lung.lateral * 0.6 * lung.a, lung.cy + 0.05 * lung.b
        d2 = ((fl.xx - hx) ** 2 + (fl.yy - hy) ** 2) * (1.0 / (0.55 * lung.a) ** 2)
        markings[side] = (ridge[fl.box] / (1.0 + d2) + 0.6 / (1.0 + 12.0 * d2 * d2)) * fl.mask * (1.0 - soft[fl.box])

    # -- findings ---------------------------------------------------------------------------------
    sc = _Scene(anat, size, fields, soft)
    for f in findings:
        frng = np.random.default_rng([seeds[2], FINDINGS.index(f.category)])
        if f.category == "opacity":
            box, add = _draw_opacity(f, sc, frng)
        elif f.category == "nodule":
            box, add = _draw_nodule(f, sc, frng)
        elif f.category == "effusion":
            box, add = _draw_effusion(f, sc, frng)
        elif f.category == "pneumothorax":
            box, region, line = _draw_pneumothorax(f, sc, frng)
            add = 0.25 * line - 0.2 * region
            markings[f.side] = markings[f.side] * (1.0 - region)  # no lung markings in the air
        else:
            continue  # cardiomegaly was drawn with the heart
        att[box] += add
    for side, fl in fields.items():
        att[fl.box] += anat.dens_vessel * markings[side]

    # -- detector: noise, blur (one separable pass), then a random tone curve via a lookup ---------
    noise_rng = np.random.default_rng(seeds[1])
    att = att + (noise_rng.random((size, size), dtype=np.float32) - 0.5) * (anat.noise_sigma * 3.464)
    att = _blur(att.astype(np.float32, copy=False), 0.8 * size / 128.0)
    idx = (_clip(att, 0.0, 1.0) * (_LUT_SIZE - 1)).astype(np.intp)
    lut = _tone_lut(round(anat.gamma, 2), round(anat.gain, 2), round(anat.offset, 2))
    return lut[idx], anat


def render(findings: list[Finding], rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Draw a grayscale (size, size) uint8 radiograph showing exactly ``findings``.

    See :func:`render_with_anatomy` for how ``rng`` is used.
    """
    return render_with_anatomy(findings, rng, size)[0]


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

# Positive sentences: every one carries the severity word, the exact category word, and (for
# located findings) the side and zone words. Normal statements never carry a severity word; that
# is what parse_report keys on to tell positive statements from normal ones.
_FINDING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "opacity": (
        "There is a {sev} opacity in the {side} {zone} lung zone.",
        "A {sev} opacity is seen in the {side} {zone} lung zone.",
        "{Sev} airspace opacity in the {side} {zone} lung zone.",
    ),
    "nodule": (
        "There is a {sev} nodule in the {side} {zone} lung zone.",
        "A {sev} pulmonary nodule is present in the {side} {zone} lung zone.",
        "{Sev} rounded nodule in the {side} {zone} lung zone.",
    ),
    "effusion": (
        "There is a {sev} {side} pleural effusion in the {zone} zone.",
        "A {sev} pleural effusion is seen at the {side} base, {zone} zone.",
        "{Sev} {side} pleural effusion layering in the {zone} zone.",
    ),
    "pneumothorax": (
        "There is a {sev} {side} pneumothorax in the {zone} zone.",
        "A {sev} pneumothorax is seen at the {side} apex, {zone} zone.",
        "{Sev} {side} apical pneumothorax in the {zone} zone.",
    ),
    "cardiomegaly": (
        "There is {sev} cardiomegaly.",
        "{Sev} cardiomegaly is present.",
        "The cardiac silhouette is enlarged, consistent with {sev} cardiomegaly.",
    ),
}
_LUNGS_CLEAR = ("The lungs are clear.", "Lungs are clear.")
_NO_CONSOLIDATION = ("No focal consolidation.",)
_HEART_NORMAL = ("Heart size is normal.", "The cardiac silhouette is normal in size.")
_NO_EFF_NO_PTX = ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.")
_NO_EFF = ("No pleural effusion.",)
_NO_PTX = ("No pneumothorax.",)
_IMPRESSION_NORMAL = "No acute cardiopulmonary process."
_IMPRESSION_TEMPLATES = {
    "opacity": "{Sev} {side} {zone} lung opacity.",
    "nodule": "{Sev} {side} {zone} lung nodule.",
    "effusion": "{Sev} {side} pleural effusion in the {zone} zone.",
    "pneumothorax": "{Sev} {side} pneumothorax in the {zone} zone.",
    "cardiomegaly": "{Sev} cardiomegaly.",
}


def _fill(template: str, f: Finding) -> str:
    return template.format(sev=f.severity, Sev=f.severity.capitalize(), side=f.side, zone=f.zone)


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def impression_sentence(f: Finding) -> str:
    """The single IMPRESSION sentence for a finding (fixed wording, shared with the prompts)."""
    return _fill(_IMPRESSION_TEMPLATES[f.category], f)


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """Return (FINDINGS text, IMPRESSION text) describing exactly ``findings``.

    FINDINGS varies its phrasing (so the text tower cannot key on one fixed string) but always
    names severity, category, side and zone; absent categories get normal statements, which
    never contain a severity word (that is how :func:`parse_report` tells them apart).
    IMPRESSION has one fixed sentence per finding, which is what the zero-shot prompts mirror.
    """
    cats = {f.category for f in findings}
    parts = [_fill(_pick(_FINDING_TEMPLATES[f.category], rng), f) for f in findings]
    if not cats:
        # Kept for entirely normal studies (not cardiomegaly alone) so that it is, like the
        # normal impression, a phrase the no_finding prompts can rely on.
        parts.append(_pick(_LUNGS_CLEAR, rng))
    elif "opacity" not in cats:
        parts.append(_pick(_NO_CONSOLIDATION, rng))
    if "cardiomegaly" not in cats:
        parts.append(_pick(_HEART_NORMAL, rng))
    if "effusion" not in cats and "pneumothorax" not in cats:
        parts.append(_pick(_NO_EFF_NO_PTX, rng))
    elif "effusion" not in cats:
        parts.append(_pick(_NO_EFF, rng))
    elif "pneumothorax" not in cats:
        parts.append(_pick(_NO_PTX, rng))
    impression = " ".join(impression_sentence(f) for f in findings) if findings else _IMPRESSION_NORMAL
    return " ".join(parts), impression


def _words(pattern: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(pattern) + r")\b")


_RE_SEV, _RE_CAT = _words(SEVERITIES), _words(FINDINGS)
_RE_SIDE, _RE_ZONE = _words(SIDES), _words(ZONES)


def parse_report(findings_text: str) -> list[Finding]:
    """Recover the findings from a FINDINGS section written by :func:`write_report`.

    A sentence is a positive statement exactly when it contains a severity word (normal
    statements such as "No pleural effusion." never do); it must then name exactly one category,
    and one side and zone unless the category is cardiomegaly. Anything else raises ValueError,
    so a template change that breaks the round trip fails loudly.
    """
    out: list[Finding] = []
    for raw in re.split(r"(?<=\.)\s+", findings_text.strip()):
        s = raw.strip().lower()
        sevs = _RE_SEV.findall(s)
        if not sevs:
            continue
        cats, sides, zones = _RE_CAT.findall(s), _RE_SIDE.findall(s), _RE_ZONE.findall(s)
        if len(sevs) != 1 or len(cats) != 1:
            raise ValueError(f"ambiguous finding sentence: {raw!r}")
        if cats[0] == "cardiomegaly":
            if sides or zones:
                raise ValueError(f"cardiomegaly sentence names a location: {raw!r}")
            out.append(Finding("cardiomegaly", sevs[0]))
            continue
        if len(sides) != 1 or len(zones) != 1:
            raise ValueError(f"finding sentence needs one side and one zone: {raw!r}")
        out.append(Finding(cats[0], sevs[0], sides[0], zones[0]))
    return out


def _zero_shot_prompts() -> dict[str, list[str]]:
    prompts: dict[str, list[str]] = {NO_FINDING: [_IMPRESSION_NORMAL.lower(), _LUNGS_CLEAR[0].lower()]}
    for cat in FINDINGS:
        fs: list[Finding] = []
        for sev in SEVERITIES:
            if cat == "cardiomegaly":
                fs.append(Finding(cat, sev))
                continue
            for side in SIDES:
                for zone in (_FIXED_ZONE[cat],) if cat in _FIXED_ZONE else ZONES:
                    fs.append(Finding(cat, sev, side, zone))
        prompts[cat] = [impression_sentence(f).lower() for f in fs]
    return prompts


ZERO_SHOT_PROMPTS: dict[str, list[str]] = _zero_shot_prompts()
"""Class name -> lower-cased IMPRESSION sentences, for prompt-ensembled zero-shot classification."""


def sample_case(rng: np.random.Generator, size: int = 128) -> PhantomCase:
    """One complete study: findings, then the image, then the report, all from ``rng``."""
    findings = sample_findings(rng)
    image = render(findings, rng, size)
    findings_text, impression_text = write_report(findings, rng)
    return PhantomCase(image, findings, findings_text, impression_text, "PA")
