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

    The field is an ellipse-like shape centred at (cx, cy) with half-width ``a`` and half-height
    ``b``: rounded above, a flatter diaphragm with sharp costophrenic angles below.
    ``lateral`` is +1 when the lung's outer edge is towards larger x (the patient's left lung).
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
    """Patient geometry and densities drawn for one image (before findings change it).

    Exposed so tests and analysis code can locate zones and the heart in the pixels.
    """

    lungs: dict[str, Lung]  # keyed by the patient's side
    heart_cx: float
    heart_cy: float
    heart_ry: float
    ctr: float  # cardiothoracic ratio of the normal heart drawn for this patient
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
    vessel_profile: tuple[np.ndarray, np.ndarray]  # per-lung radial streak noise (right, left)
    gamma: float
    gain: float
    offset: float
    noise_sigma: float

    @property
    def thoracic_width(self) -> float:
        """Widest inner thoracic width, taken as outer lung edge to outer lung edge."""
        r, l = self.lungs["right"], self.lungs["left"]
        return (l.cx + l.a) - (r.cx - r.a)

    def heart_width(self, ctr: float | None = None) -> float:
        return (self.ctr if ctr is None else ctr) * self.thoracic_width

    def zone_box(self, side: str, zone: str) -> tuple[float, float, float, float]:
        """(x0, x1, y0, y1), normalised, of the named zone of the patient's ``side`` lung."""
        return self.lungs[side].zone_box(zone)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: size, position, proportions and densities all jittered.

    The jitter keeps the model from matching fixed pixel positions and brightnesses, while the
    ranges are narrow enough that zones stay where a radiologist would expect them.
    """
    u = rng.uniform
    s = u(0.93, 1.04)
    ox, oy = u(-0.025, 0.025), u(-0.025, 0.02)
    mid = 0.5 + ox
    gap = 0.045 * s * u(0.9, 1.1)
    a_r, a_l = 0.150 * s * u(0.95, 1.05), 0.145 * s * u(0.95, 1.05)
    b_r, b_l = 0.300 * s * u(0.95, 1.05), 0.300 * s * u(0.95, 1.05)
    cy = 0.47 + oy
    right = Lung(mid - gap - a_r, cy, a_r, b_r, lateral=-1)
    left = Lung(mid + gap + a_l, cy + 0.012 * s, a_l, b_l, lateral=+1)
    vessel = (u(-1.0, 1.0, 40), u(-1.0, 1.0, 40))
    return Anatomy(
        lungs={"right": right, "left": left},
        heart_cx=mid,
        heart_cy=left.cy + 0.62 * left.b,
        heart_ry=0.14 * s * u(0.93, 1.07),
        ctr=u(0.38, 0.45),
        scale=s,
        body_cx=mid,
        body_cy=0.66 + oy,
        body_a=((left.cx + left.a) - (right.cx - right.a)) / 2 + 0.085 * s * u(0.9, 1.15),
        body_b=0.66 * s,
        mediastinum_halfwidth=0.05 * s * u(0.9, 1.1),
        dens_body=u(0.47, 0.56),
        dens_air=u(0.34, 0.40),
        dens_heart=u(0.08, 0.13),
        dens_mediastinum=u(0.10, 0.15),
        dens_spine=u(0.06, 0.10),
        dens_rib=u(0.05, 0.08),
        dens_clavicle=u(0.08, 0.12),
        dens_vessel=u(0.06, 0.10),
        rib_spacing=0.072 * s * u(0.92, 1.08),
        rib_phase=u(0.0, 1.0),
        rib_curve=u(0.25, 0.4),
        vessel_profile=vessel,
        gamma=u(0.85, 1.15),
        gain=u(0.88, 1.08),
        offset=u(-0.04, 0.04),
        noise_sigma=u(0.012, 0.028),
    )


# ---------------------------------------------------------------------------------------------
# Rendering helpers (all vectorised over a cached pixel grid)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _edge(d: np.ndarray, size: int, width_px: float = 1.0) -> np.ndarray:
    """Anti-aliased step: 1 where the signed distance ``d`` (normalised units) is positive."""
    return np.clip(d * (size / width_px) + 0.5, 0.0, 1.0)


def _lung_radius(lung: Lung, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape function r (< 1 inside) and the vertical coordinate v in [-1, 1] of a lung field.

    Above the centre the field is elliptical (rounded apex); below, a 3-norm with a raised dome
    gives a flatter diaphragm with pointed costophrenic angles.
    """
    u = (xx - lung.cx) / lung.a
    v = (yy - lung.cy) / lung.b
    au = np.minimum(np.abs(u), 1.5)
    top = np.sqrt(u * u + v * v)
    vb = np.maximum(v, 0.0) * (1.0 + 0.22 * (1.0 - au * au))
    bottom = (au**3 + vb**3) ** (1.0 / 3.0)
    return np.where(v < 0, top, bottom), v


def _lung_mask(lung: Lung, r: np.ndarray, size: int) -> np.ndarray:
    return _edge((1.0 - r) * min(lung.a, lung.b), size, 1.2)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    g = rng.random((cells, cells)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * (cells - 1)
    i0 = np.minimum(t.astype(np.int64), cells - 2)
    f = t - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur by summing shifted slices (no per-pixel Python loops)."""
    if sigma_px <= 0.05:
        return img
    r = max(1, int(np.ceil(2.5 * sigma_px)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2).astype(np.float32)
    k /= k.sum()
    n = img.shape[0]
    p = np.pad(img, r, mode="edge")
    tmp = sum(k[i] * p[i : i + n, :] for i in range(2 * r + 1))
    return sum(k[i] * tmp[:, i : i + n] for i in range(2 * r + 1))


def _segment_dist(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))


def _heart_mask(anat: Anatomy, width: float, ry: float, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Heart silhouette: a third of its width to the image's left of the midline, two thirds to
    the right (the patient's left), as on a real PA film."""
    rx = np.where(xx < anat.heart_cx, 0.34 * width, 0.66 * width)
    u = (xx - anat.heart_cx) / rx
    v = (yy - anat.heart_cy) / ry
    r = np.sqrt(u * u + v * v)
    return _edge((1.0 - r) * np.minimum(rx, ry), size, 1.2)


def _severity_index(f: Finding) -> int:
    return SEVERITIES.index(f.severity)


# Severity tables: index 0/1/2 = mild/moderate/severe.
_CARDIO_CTR = (0.55, 0.62, 0.70)
_OPACITY_SIZE = (0.50, 0.66, 0.82)  # fraction of lung half-width / half zone height
_OPACITY_DENS = (0.24, 0.30, 0.36)
_NODULE_RADIUS = (0.020, 0.025, 0.030)  # normalised, before patient scale
_EFFUSION_HEIGHT = (0.15, 0.30, 0.45)  # fraction of lung height
_PTX_DEPTH = (0.20, 0.32, 0.46)  # fraction of the lung's shape radius


def _draw_opacity(f: Finding, anat: Anatomy, lungs: dict[str, tuple], rng: np.random.Generator,
                  yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    lung = anat.lungs[f.side]
    _, _, mask = lungs[f.side]
    x0, x1, y0, y1 = lung.zone_box(f.zone)
    k = _severity_index(f)
    zh = y1 - y0
    cx = lung.cx + lung.lateral * rng.uniform(0.0, 0.3) * lung.a
    cy = (y0 + y1) / 2 + rng.uniform(-0.08, 0.08) * zh
    if f.zone == "upper":  # the apex is narrow: keep the blob where there is lung
        cy += 0.12 * zh
    rx = _OPACITY_SIZE[k] * lung.a * rng.uniform(0.92, 1.08)
    ry = _OPACITY_SIZE[k] * zh / 2 * rng.uniform(0.95, 1.1)
    d2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    blob = np.clip(1.0 - d2, 0.0, 1.0) ** 1.2
    mottle = 0.65 + 0.35 * _smooth_noise(rng, size, 9)
    return _OPACITY_DENS[k] * rng.uniform(0.92, 1.08) * blob * mottle * mask


def _draw_nodule(f: Finding, anat: Anatomy, lungs: dict[str, tuple], heart: np.ndarray, rng: np.random.Generator,
                 yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    lung = anat.lungs[f.side]
    x0, x1, y0, y1 = lung.zone_box(f.zone)
    k = _severity_index(f)
    rad = _NODULE_RADIUS[k] * anat.scale * rng.uniform(0.95, 1.05)
    # Rejection-sample a centre well inside the lung, inside the zone, and clear of the heart.
    h_w = anat.heart_width() * 0.66 + 0.02
    cx = cy = 0.0
    for _ in range(64):
        cx = rng.uniform(x0 + 0.15 * lung.a, x1 - 0.15 * lung.a)
        cy = rng.uniform(y0 + 0.22 * (y1 - y0), y1 - 0.22 * (y1 - y0))
        rr, _ = _lung_radius(lung, np.float32(cy), np.float32(cx))
        clear_of_heart = not (lung.lateral > 0 and cx < anat.heart_cx + h_w and cy > anat.heart_cy - anat.heart_ry)
        if rr < 1.0 - 2.2 * rad / min(lung.a, lung.b) and clear_of_heart:
            break
    d = np.hypot(xx - cx, yy - cy)
    disc = _edge(rad - d, size, 0.8)
    dome = 0.75 + 0.25 * np.sqrt(np.clip(1.0 - (d / rad) ** 2, 0.0, 1.0))
    return 0.40 * rng.uniform(0.92, 1.08) * disc * dome


def _draw_effusion(f: Finding, anat: Anatomy, lungs: dict[str, tuple], rng: np.random.Generator,
                   yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    lung = anat.lungs[f.side]
    _, _, mask = lungs[f.side]
    k = _severity_index(f)
    h = (_EFFUSION_HEIGHT[k] + rng.uniform(-0.02, 0.02)) * 2 * lung.b
    lat = np.clip(lung.lateral * (xx - lung.cx) / lung.a, -1.0, 1.0)  # -1 medial .. +1 lateral
    meniscus = rng.uniform(0.06, 0.09) * 2 * lung.b * ((lat + 1.0) / 2.0) ** 2
    level = lung.bottom - h - meniscus  # rises laterally: a concave (meniscus) upper border
    fill = _edge(yy - level, size, 1.5)
    depth = np.clip((yy - level) / max(h, 1e-3), 0.0, 1.0)
    return 0.38 * rng.uniform(0.95, 1.05) * fill * (0.88 + 0.12 * depth) * mask


def _draw_pneumothorax(f: Finding, anat: Anatomy, lungs: dict[str, tuple], rng: np.random.Generator,
                       size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (dark region mask in [0, 1], pleural line intensity)."""
    lung = anat.lungs[f.side]
    r, v, mask = lungs[f.side]
    k = _severity_index(f)
    r0 = 1.0 - _PTX_DEPTH[k] * rng.uniform(0.92, 1.08)
    # Keep the collapse above the upper zone's lower border (v = -1/3), tapering out just above.
    vtaper = np.clip((-0.36 - v) / 0.1, 0.0, 1.0)
    scale_px = min(lung.a, lung.b) * size
    region = np.clip((r - r0) * scale_px / 1.0 + 0.5, 0.0, 1.0) * mask * vtaper
    line = np.exp(-(((r - r0) * scale_px / 0.9) ** 2)) * mask * vtaper
    return region, line


def render_with_anatomy(findings: list[Finding], rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, Anatomy]:
    """Render a study and also return the patient geometry it was drawn on.

    Takes exactly one draw from ``rng`` and splits it into independent streams (anatomy, noise,
    one per finding category), so the same seed yields the same patient and noise whatever
    the findings: the difference between two renders is the finding alone.
    """
    seeds = rng.integers(0, 2**63 - 1, size=3)
    anat = sample_anatomy(np.random.default_rng(int(seeds[0])))
    noise_rng = np.random.default_rng(int(seeds[1]))
    yy, xx = _grid(size)
    f32 = np.float32

    # -- anatomy ---------------------------------------------------------------------------
    bx = (xx - anat.body_cx) / anat.body_a
    by = (yy - anat.body_cy) / anat.body_b
    body_r = (np.abs(bx) ** 2.6 + np.abs(by) ** 2.6) ** (1 / 2.6)
    neck = _edge(0.065 * anat.scale - np.abs(xx - anat.body_cx), size, 1.5) * (yy < 0.2)
    body = np.maximum(_edge((1.0 - body_r) * anat.body_a, size, 2.0), neck)
    thick = 1.0 + 0.18 * np.clip(1.0 - np.abs(xx - anat.body_cx) / anat.body_a, 0.0, 1.0)
    att = anat.dens_body * body * thick

    lungs: dict[str, tuple] = {}
    for side, lung in anat.lungs.items():
        r, v = _lung_radius(lung, yy, xx)
        lungs[side] = (r, v, _lung_mask(lung, r, size))

    cardio = next((f for f in findings if f.category == "cardiomegaly"), None)
    ctr = anat.ctr
    ry = anat.heart_ry
    if cardio is not None:
        k = _severity_index(cardio)
        crng = np.random.default_rng([int(seeds[2]), FINDINGS.index("cardiomegaly")])
        ctr = _CARDIO_CTR[k] + crng.uniform(-0.012, 0.012)
        ry *= (1.04, 1.08, 1.12)[k]
    heart = _heart_mask(anat, anat.heart_width(ctr), ry, yy, xx, size)

    mw = anat.mediastinum_halfwidth
    upper_med = _edge(mw - np.abs(xx - anat.heart_cx), size, 1.5) * _edge(anat.heart_cy - yy, size, 1.0)
    knob = _edge(0.03 * anat.scale - np.hypot(xx - (anat.heart_cx + mw * 0.9), yy - (anat.lungs["left"].top + 0.12)), size)
    mediastinum = np.maximum(np.maximum(upper_med, knob), heart)
    lung_air = np.clip(lungs["right"][2] + lungs["left"][2], 0.0, 1.0) * (1.0 - mediastinum)
    att = att - anat.dens_air * lung_air
    att = att + anat.dens_heart * heart + anat.dens_mediastinum * upper_med * (1.0 - heart) + 0.06 * knob
    spine = _edge(0.028 * anat.scale - np.abs(xx - anat.heart_cx), size, 1.5) * body
    att = att + anat.dens_spine * spine

    # Posterior ribs: bands periodic in y along curves that dip laterally; clavicles on top.
    dxm = np.abs(xx - anat.heart_cx)
    yr = yy - anat.rib_curve * (dxm - 0.12) ** 2 * 4.0 + 0.08 * dxm
    phase = yr / anat.rib_spacing + anat.rib_phase
    band = np.clip(np.cos(2 * np.pi * phase) - 0.35, 0.0, None) / 0.65
    rib_zone = _edge(0.40 * anat.scale - dxm, size, 2.0) * _edge(dxm - 0.03, size) * body
    rib_zone = rib_zone * _edge(yy - (anat.lungs["right"].top - 0.06), size, 3.0)
    rib_zone = rib_zone * _edge(anat.lungs["left"].bottom + 0.02 - yy, size, 3.0)
    att = att + anat.dens_rib * band * rib_zone
    clav_y = anat.lungs["right"].top + 0.04 * anat.scale
    clav = np.zeros_like(yy)
    for sgn in (-1, 1):
        p0 = (anat.heart_cx + sgn * 0.035, clav_y + 0.025)
        p1 = (anat.heart_cx + sgn * 0.30 * anat.scale, clav_y - 0.05)
        clav = np.maximum(clav, _edge(0.014 * anat.scale - _segment_dist(yy, xx, p0, p1), size))
    att = att + anat.dens_clavicle * clav

    # Vascular markings: streaks radiating from each hilum, fading towards the periphery.
    markings = np.zeros_like(yy)
    for (side, lung), prof in zip(anat.lungs.items(), anat.vessel_profile):
        hx = lung.cx - lung.lateral * 0.65 * lung.a
        hy = lung.cy + 0.05 * lung.b
        theta = np.arctan2(yy - hy, xx - hx)
        t = (theta + np.pi) / (2 * np.pi) * len(prof)
        streak = np.interp(t, np.arange(len(prof) + 1), np.append(prof, prof[0]))
        dist = np.hypot(xx - hx, yy - hy)
        fall = np.exp(-dist / (0.5 * lung.a))
        hilum = np.exp(-(dist / (0.2 * lung.a)) ** 2)
        markings = markings + (np.clip(streak, 0.0, None) ** 2 * fall + 0.8 * hilum) * lungs[side][2]
    markings *= 1.0 - mediastinum

    # -- findings ----------------------------------------------------------------------------
    vessel_keep = np.ones_like(yy)
    for f in findings:
        frng = np.random.default_rng([int(seeds[2]), FINDINGS.index(f.category)])
        if f.category == "opacity":
            att = att + _draw_opacity(f, anat, lungs, frng, yy, xx, size)
        elif f.category == "nodule":
            att = att + _draw_nodule(f, anat, lungs, heart, frng, yy, xx, size)
        elif f.category == "effusion":
            att = att + _draw_effusion(f, anat, lungs, frng, yy, xx, size)
        elif f.category == "pneumothorax":
            region, line = _draw_pneumothorax(f, anat, lungs, frng, size)
            att = att - 0.13 * region + 0.22 * line
            vessel_keep = vessel_keep * (1.0 - region)
    att = att + anat.dens_vessel * markings * vessel_keep

    # -- detector -----------------------------------------------------------------------------
    px = size / 128.0
    img = _blur(att.astype(f32), 0.8 * px)
    img = np.clip(img, 0.0, 1.0) ** anat.gamma
    img = anat.gain * img + anat.offset
    img = img + noise_rng.normal(0.0, anat.noise_sigma, img.shape).astype(f32)
    img = _blur(img, 0.5 * px)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), anat


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
    names severity, category, side and zone; absent categories get normal statements.
    IMPRESSION has one fixed sentence per finding, which is what the zero-shot prompts mirror.
    """
    cats = {f.category for f in findings}
    parts = [_fill(_pick(_FINDING_TEMPLATES[f.category], rng), f) for f in findings]
    if not cats & {"opacity", "nodule", "effusion", "pneumothorax"}:
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
