"""synth-drive: a camera driving forward on a procedurally generated road, labelled with the 19
Cityscapes trainIds, with RGB, instance ids and exact backward optical flow.

Geometry. The world is written in road-aligned coordinates: s is the distance along the road's
centre line, d the lateral offset from it (positive to the right), v the height above the ground.
The camera at frame t sits at (s_t, d_cam_t, CAM_HEIGHT) looking along the road's tangent. A world
point at depth Z = s - s_t has camera coordinates

    X = d + c_t(Z),   c_t(Z) = Phi(s_t + Z) - Phi(s_t) - Z * theta(s_t) - d_cam_t,

with theta the road heading and Phi its integral (the small-angle form of following a curved road),
and projects to pixel x = cx + f X / Z, y = y_h + f (h - v) / Z. Every surface is a ground plane,
a vertical plane along the road ("side": constant d), a vertical plane facing the camera
("front": constant s) or a horizontal plane ("top": constant v). Each pixel is ray cast against
them (z-buffer), so it knows the exact world point it shows; the backward flow is that point
(moved back by its object's displacement) projected with the camera of frame t-1.

Scene types (urban, rural, highway) follow each other along the road with smooth transitions;
road width, sidewalks, camera lane, speed, curvature and what stands beside the road all follow
the mix, so the scene changes over hundreds of frames and a long rollout has no loop to fall into.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
           "motorcycle", "bicycle")
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
           (0, 80, 100), (0, 0, 230), (119, 11, 32))
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER,
 CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
FPS = 10

CAM_HEIGHT = 1.65
Z_NEAR = 0.8          # nearest depth a vertical plane is drawn at
Z_FAR = 650.0         # farthest depth an object is drawn at
DS = 0.5              # step of the road tables along s (metres)
MIN_PIXELS = 1.2      # objects whose projected height is below this are not drawn

URBAN, RURAL, HIGHWAY = 0, 1, 2
# per scene type: road half width, sidewalk width, camera lateral position, camera speed (m/frame),
# curvature scale (1/m)
SCENE = np.array([[6.0, 3.5, 1.6, 0.60, 0.0030],
                  [3.6, 0.0, 1.8, 0.78, 0.0085],
                  [9.0, 0.0, 2.35, 0.95, 0.0022]])


# ----------------------------------------------------------------------------- texture helpers

_NOISE_TABLE = np.random.default_rng(20210412).uniform(-1.0, 1.0, (256, 256)).astype(np.float32)


def noise2(u, v):
    """Smooth value noise in [-1, 1] on a fixed lattice (period 256), identical for every sequence
    so that a material looks the same everywhere; callers offset u, v per object."""
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu = fu * fu * (3 - 2 * fu)
    fv = fv * fv * (3 - 2 * fv)
    i0 = iu.astype(np.int64) & 255
    j0 = iv.astype(np.int64) & 255
    i1, j1 = (i0 + 1) & 255, (j0 + 1) & 255
    t = _NOISE_TABLE
    top = t[j0, i0] + (t[j0, i1] - t[j0, i0]) * fu
    bottom = t[j1, i0] + (t[j1, i1] - t[j1, i0]) * fu
    return top + (bottom - top) * fv


def fade(footprint, freq):
    """Texture amplitude that keeps a pattern of `freq` cycles/m from aliasing when one pixel
    covers `footprint` metres (a cheap stand-in for mip-mapping)."""
    return np.clip((0.3 - footprint * freq) / 0.2, 0.0, 1.0)


def box(x, lo, hi, m):
    """Fraction of the pixel footprint [x - m/2, x + m/2] inside [lo, hi] (box-filtered edge)."""
    h = 0.5 * m
    return (np.clip(x + h, lo, hi) - np.clip(x - h, lo, hi)) / m


def periodic_box(x, period, start, width, m):
    """Fraction of the footprint [x - m/2, x + m/2] covered by the stripes [start + k period,
    start + width + k period] (0 <= start, start + width <= period); exact for any footprint."""
    def cumulative(y):
        k = np.floor(y / period)
        return k * width + np.clip(y - k * period - start, 0.0, width)
    h = 0.5 * m
    return (cumulative(x + h) - cumulative(x - h)) / m


def _rgb(*c):
    return np.array(c, np.float32)


# ----------------------------------------------------------------------------- scene description

class Face:
    """One planar piece of an object, in coordinates relative to the object's origin (s_o, d_o).

    kind 'front': plane s = s_o + fixed, a = d - d_o in [a0, a1], b = v in [b0, b1]
    kind 'side' : plane d = d_o + fixed, a = s - s_o in [a0, a1], b = v in [b0, top(a) or b1];
                  normal +1/-1 draws it only when seen from +d/-d, 0 from both sides
    kind 'top'  : plane v = fixed, a = s - s_o in [a0, a1], b = d - d_o in [b0, b1]
    mask(a, b) cuts the silhouette, paint(a, b, ma, mb) gives RGB (ma, mb: metres per pixel
    along a and b), min_px keeps thin poles at least that many pixels wide.
    """
    __slots__ = ("kind", "label", "inst", "fixed", "a0", "a1", "b0", "b1", "top", "mask", "paint",
                 "normal", "min_px")

    def __init__(self, kind, label, inst, fixed, a, b, paint, mask=None, top=None, normal=0, min_px=0.0):
        self.kind, self.label, self.inst, self.fixed = kind, label, inst, float(fixed)
        self.a0, self.a1 = float(min(a)), float(max(a))
        self.b0, self.b1 = float(min(b)), float(max(b))
        self.paint, self.mask, self.top, self.normal, self.min_px = paint, mask, top, normal, min_px


class Thing:
    """An object: faces plus a position, static (floats) or per frame (arrays, with `alive`)."""
    __slots__ = ("faces", "s", "d", "alive", "s_lo", "s_hi", "d_lo", "d_hi", "height")

    def __init__(self, faces, s, d, alive=None):
        self.faces, self.s, self.d, self.alive = faces, s, d, alive
        lo, hi, lat, height = [], [], [], 0.0
        for face in faces:
            if face.kind == "front":
                lo.append(face.fixed), hi.append(face.fixed), lat.extend((face.a0, face.a1))
                height = max(height, face.b1)
            elif face.kind == "side":
                lo.append(face.a0), hi.append(face.a1), lat.append(face.fixed)
                height = max(height, face.b1)
            else:
                lo.append(face.a0), hi.append(face.a1), lat.extend((face.b0, face.b1))
                height = max(height, face.fixed)
        self.s_lo, self.s_hi, self.height = min(lo), max(hi), height
        self.d_lo, self.d_hi = min(lat), max(lat)


class View:
    """The camera at one frame."""
    __slots__ = ("world", "s", "theta", "phi", "dcam")

    def __init__(self, world, t):
        self.world = world
        self.s = float(world.cam_s[t])
        self.theta = float(np.interp(self.s, world.sg, world.theta))
        self.phi = float(np.interp(self.s, world.sg, world.Phi))
        self.dcam = float(world.cam_d[t])

    def c(self, Z):
        w = self.world
        return np.interp(self.s + Z, w.sg, w.Phi) - self.phi - Z * self.theta - self.dcam


# ----------------------------------------------------------------------------- materials

def flat(col, amp=0.06, freq=1.0, amp2=0.0, freq2=0.15, off=(0.0, 0.0)):
    col = _rgb(*col)

    def paint(a, b, ma, mb):
        m = np.maximum(ma, mb)
        u, v = a + off[0], b + off[1]
        n = amp * fade(m, freq) * noise2(u * freq, v * freq)
        if amp2:
            n = n + amp2 * fade(m, freq2) * noise2(u * freq2 + 71.3, v * freq2 + 13.7)
        return col[None, :] * (1.0 + n)[:, None]
    return paint


def shaded(paint, factor):
    def shaded_paint(a, b, ma, mb):
        return paint(a, b, ma, mb) * factor
    return shaded_paint


def facade(col, win_col, floor_h, spacing, win_w, win_h, off, shop_col):
    col, win_col, shop_col = _rgb(*col), _rgb(*win_col), _rgb(*shop_col)

    def paint(a, b, ma, mb):
        u = a + off
        base = col[None] * (1 + 0.05 * fade(np.maximum(ma, mb), 1.3) * noise2(u * 1.3, b * 1.3 + off))[:, None]
        wx = periodic_box(u, spacing, 0.5 * (spacing - win_w), win_w, ma)
        wy = periodic_box(b, floor_h, 0.45 * floor_h, win_h, mb) * box(b, floor_h, 1e9, mb)
        shop = box(b, 0.25, 2.7, mb) * periodic_box(u, 2 * spacing, 0.4, 2 * spacing - 0.8, ma)
        w = np.clip(wx * wy, 0, 1)[:, None]
        s = shop[:, None]
        glass = win_col[None] * (0.8 + 0.35 * np.clip(noise2(u * 0.3, b * 0.3) + 0.3, 0, 1))[:, None]
        out = base * (1 - w) + glass * w
        out = out * (1 - s) + shop_col[None] * s
        return out * (0.8 + 0.2 * np.clip(b / 3.0, 0, 1))[:, None]
    return paint


def glass(tint=(45, 55, 68)):
    tint = _rgb(*tint)

    def paint(a, b, ma, mb):
        return tint[None] * (0.8 + 0.5 * np.clip(b - 0.9, 0, 1))[:, None]
    return paint


def car_body(col, end, half_w):
    """Paint of a car's rear or front end (`end`): body colour, lamps, plate, tyres."""
    col = _rgb(*col)
    dark = _rgb(30, 30, 32)
    lamp = _rgb(200, 30, 25) if end == "rear" else _rgb(235, 230, 200)
    plate = _rgb(225, 225, 215)

    def paint(a, b, ma, mb):
        out = col[None] * (0.75 + 0.3 * np.clip((b - 0.3) / 0.6, 0, 1))[:, None]
        bumper = box(b, -1, 0.38, mb)[:, None]
        out = out * (1 - 0.45 * bumper)
        lamps = (box(np.abs(a), half_w - 0.32, half_w - 0.06, ma) * box(b, 0.62, 0.8, mb))[:, None]
        pl = (box(a, -0.25, 0.25, ma) * box(b, 0.42, 0.56, mb))[:, None]
        out = out * (1 - lamps) + lamp[None] * lamps
        out = out * (1 - pl) + plate[None] * pl
        tyre = (box(b, -1, 0.3, mb) * box(np.abs(a), half_w - 0.3, half_w, ma))[:, None]
        return out * (1 - tyre) + dark[None] * tyre
    return paint


def car_side(col, length):
    col = _rgb(*col)
    tyre = _rgb(28, 28, 30)
    rim = _rgb(150, 150, 155)
    centres = (0.85, length - 0.85)

    def paint(a, b, ma, mb):
        out = col[None] * (0.7 + 0.3 * np.clip((b - 0.3) / 0.6, 0, 1))[:, None]
        r = np.minimum(np.hypot(a - centres[0], b - 0.32), np.hypot(a - centres[1], b - 0.32))
        t = np.clip((0.34 - r) / np.maximum(mb, 1e-3) + 0.5, 0, 1)[:, None]
        c = np.clip((0.17 - r) / np.maximum(mb, 1e-3) + 0.5, 0, 1)[:, None]
        out = out * (1 - t) + tyre[None] * t
        return out * (1 - c) + rim[None] * c
    return paint


def side_windows(col, c0, c1):
    col = _rgb(*col)
    g = _rgb(40, 48, 60)

    def paint(a, b, ma, mb):
        inside = (box(a, c0 + 0.25, c1 - 0.2, ma) * box(b, 1.0, 1.38, mb))
        pillar = periodic_box(a - c0, (c1 - c0) / 2, (c1 - c0) / 2 - 0.08, 0.08, ma)
        w = np.clip(inside - pillar, 0, 1)[:, None]
        return col[None] * 0.9 * (1 - w) + g[None] * w
    return paint


# ----------------------------------------------------------------------------- object builders

def wheels_mask_end(half_w, clearance=0.3, tyre=0.28):
    def mask(a, b):
        return (b >= clearance) | (np.abs(a) >= half_w - tyre)
    return mask


def wheels_mask_side(length, clearance=0.3, radius=0.34, centres=None):
    centres = centres or (0.85, length - 0.85)

    def mask(a, b):
        m = b >= clearance
        for c in centres:
            m = m | ((a - c) ** 2 + (b - radius + 0.02) ** 2 <= radius * radius)
        return m
    return mask


def make_car(rng, inst, facing, col=None):
    """A car seen from behind (facing='away') or from the front (facing='toward')."""
    length = rng.uniform(3.9, 4.8)
    hw = rng.uniform(0.84, 0.94)
    body = rng.uniform(0.88, 1.0)
    roof = rng.uniform(1.38, 1.52) if rng.random() < 0.8 else rng.uniform(1.7, 1.9)
    col = col if col is not None else CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
    if facing == "away":
        c0, c1 = rng.uniform(0.7, 1.0), length - rng.uniform(1.3, 1.7)
    else:
        c0, c1 = rng.uniform(1.2, 1.6), length - rng.uniform(0.6, 0.9)
    cw = hw - 0.12
    end = "rear" if facing == "away" else "front"
    faces = [Face("front", CAR, inst, 0.0, (-hw, hw), (0, body), car_body(col, end, hw), mask=wheels_mask_end(hw)),
             Face("top", CAR, inst, body, (0, length), (-hw, hw), shaded(flat(col, 0.03), 1.05))]
    for side in (-1, 1):
        faces.append(Face("side", CAR, inst, side * hw, (0, length), (0, body), car_side(col, length),
                          mask=wheels_mask_side(length), normal=side))
        slope = 0.35

        def cabin_side_mask(a, b, c0=c0, c1=c1, body=body, roof=roof):
            f = (b - body) / (roof - body)
            return (a >= c0 + slope * f) & (a <= c1 - 0.5 * slope * f)
        faces.append(Face("side", CAR, inst, side * cw, (c0, c1), (body, roof), side_windows(col, c0, c1),
                          mask=cabin_side_mask, normal=side))

    def cabin_end_mask(a, b, body=body, roof=roof):
        return np.abs(a) <= cw - 0.18 * (b - body) / (roof - body)
    win = glass()

    def cabin_end(a, b, ma, mb):
        frame = (np.abs(a) > cw - 0.12) | (b < body + 0.06)
        out = win(a, b, ma, mb)
        out[frame] = _rgb(*col) * 0.9
        return out
    faces.append(Face("front", CAR, inst, c0 + 0.3, (-cw, cw), (body, roof), cabin_end, mask=cabin_end_mask))
    faces.append(Face("top", CAR, inst, roof, (c0 + 0.3, c1 - 0.2), (-cw + 0.05, cw - 0.05), shaded(flat(col, 0.03), 1.08)))
    return faces, length


CAR_COLOURS = ((220, 220, 222), (30, 30, 34), (150, 152, 158), (160, 30, 30), (35, 60, 130),
               (40, 80, 55), (200, 170, 60), (110, 110, 118), (235, 235, 230), (90, 40, 30))


def make_big_vehicle(rng, inst, facing, label):
    """A truck (cab + box) or a bus, as boxes; front or rear towards the camera."""
    hw = 1.25
    tyre = _rgb(28, 28, 30)
    if label == BUS:
        length, height = rng.uniform(10.5, 12.0), rng.uniform(3.0, 3.2)
        col = ((215, 190, 40), (200, 40, 35), (230, 230, 225), (40, 90, 160))[rng.integers(4)]

        def bus_side(a, b, ma, mb, col=_rgb(*col), length=length):
            out = col[None] * np.ones((len(a), 1), np.float32)
            w = (box(b, 1.25, 2.55, mb) * np.clip(box(a, 0.4, length - 0.5, ma)
                                                  - periodic_box(a, 1.6, 1.45, 0.15, ma), 0, 1))[:, None]
            out = out * (1 - w) + _rgb(40, 50, 62)[None] * w
            r = np.minimum(np.hypot(a - 2.2, b - 0.5), np.hypot(a - (length - 2.8), b - 0.5))
            t = np.clip((0.5 - r) / np.maximum(mb, 1e-3) + 0.5, 0, 1)[:, None]
            return out * (1 - t) + tyre[None] * t

        def bus_end(a, b, ma, mb, col=_rgb(*col)):
            out = col[None] * np.ones((len(a), 1), np.float32)
            w = (box(b, 1.2 if facing == "toward" else 1.6, 2.75, mb) * box(np.abs(a), -1, hw - 0.12, ma))[:, None]
            out = out * (1 - w) + _rgb(40, 50, 62)[None] * w
            lamps = (box(np.abs(a), hw - 0.4, hw - 0.1, ma) * box(b, 0.5, 0.75, mb))[:, None]
            lamp = _rgb(200, 30, 25) if facing == "away" else _rgb(235, 230, 200)
            return out * (1 - lamps) + lamp[None] * lamps
        faces = [Face("front", BUS, inst, 0.0, (-hw, hw), (0.0, height), bus_end, mask=wheels_mask_end(hw, 0.35, 0.35))]
        for side in (-1, 1):
            faces.append(Face("side", BUS, inst, side * hw, (0, length), (0.0, height), bus_side,
                              mask=wheels_mask_side(length, 0.35, 0.5, (2.2, length - 2.8)), normal=side))
        return faces, length
    # truck: a cargo box and a cab
    box_len, cab_len, height = rng.uniform(7.0, 10.0), 2.3, rng.uniform(3.3, 3.9)
    col_box = ((230, 230, 228), (180, 40, 35), (60, 90, 150), (200, 200, 190))[rng.integers(4)]
    col_cab = ((230, 230, 228), (40, 70, 140), (170, 30, 30), (30, 30, 30))[rng.integers(4)]
    cargo = flat(col_box, 0.05, 0.7, 0.05)

    def cab_front(a, b, ma, mb, col=_rgb(*col_cab)):
        out = col[None] * np.ones((len(a), 1), np.float32)
        w = (box(b, 1.85, 2.75, mb) * box(np.abs(a), -1, hw - 0.15, ma))[:, None]
        out = out * (1 - w) + _rgb(40, 50, 62)[None] * w
        grille = (box(b, 0.6, 1.5, mb) * box(np.abs(a), -1, 0.7, ma))[:, None]
        return out * (1 - grille) + _rgb(60, 60, 62)[None] * grille

    def truck_side(a, b, ma, mb, col=_rgb(*col_box), centres=None):
        out = col[None] * (0.85 + 0.15 * np.clip(b / 3, 0, 1)
                           - 0.12 * periodic_box(a, 1.25, 0.0, 0.06, ma) - 0.1 * box(b, 0.9, 1.05, mb))[:, None]
        chassis = box(b, -1, 0.95, mb)[:, None]
        out = out * (1 - chassis) + _rgb(50, 50, 52)[None] * chassis
        r = np.min([np.hypot(a - c, b - 0.5) for c in centres], axis=0)
        t = np.clip((0.5 - r) / np.maximum(mb, 1e-3) + 0.5, 0, 1)[:, None]
        return out * (1 - t) + tyre[None] * t

    if facing == "away":
        length = box_len + cab_len + 0.3
        centres = (1.2, 2.4, length - 1.2)
        faces = [Face("front", TRUCK, inst, 0.0, (-hw, hw), (0.0, height), cargo, mask=wheels_mask_end(hw, 0.9, 0.55))]
        for side in (-1, 1):
            faces.append(Face("side", TRUCK, inst, side * hw, (0, box_len), (0.0, height),
                              lambda a, b, ma, mb, c=centres: truck_side(a, b, ma, mb, centres=c),
                              mask=wheels_mask_side(box_len, 0.5, 0.5, centres[:2]), normal=side))
            faces.append(Face("side", TRUCK, inst, side * (hw - 0.05), (box_len + 0.3, length), (0.0, 3.0),
                              flat(col_cab, 0.03), normal=side))
        return faces, length
    length = cab_len + 0.3 + box_len
    centres = (1.1, length - 2.4, length - 1.2)
    faces = [Face("front", TRUCK, inst, 0.0, (-hw + 0.05, hw - 0.05), (0.0, 3.0), cab_front,
                  mask=wheels_mask_end(hw, 0.45, 0.4)),
             Face("front", TRUCK, inst, cab_len + 0.3, (-hw, hw), (0.9, height), cargo)]
    for side in (-1, 1):
        faces.append(Face("side", TRUCK, inst, side * (hw - 0.05), (0, cab_len), (0.0, 3.0), flat(col_cab, 0.03),
                          mask=wheels_mask_side(cab_len, 0.95, 0.5, (1.1,)), normal=side))
        faces.append(Face("side", TRUCK, inst, side * hw, (cab_len + 0.3, length), (0.0, height),
                          lambda a, b, ma, mb, c=centres: truck_side(a, b, ma, mb, centres=c),
                          mask=wheels_mask_side(length, 0.5, 0.5, centres[1:]), normal=side))
    return faces, length


SKIN = ((235, 200, 170), (210, 165, 130), (160, 115, 80), (100, 70, 50))
CLOTHES = ((40, 40, 45), (30, 50, 110), (150, 30, 35), (230, 230, 225), (90, 90, 95), (60, 100, 60),
           (200, 150, 60), (120, 70, 140), (70, 110, 160), (170, 130, 100))


def person_shape(height, spread, arms_out):
    """Front-view silhouette in metres (a lateral, b height) and a paint for it."""
    def mask(a, b):
        u, v = a / height, b / height
        head = (u / 0.062) ** 2 + ((v - 0.925) / 0.075) ** 2 <= 1.0
        neck = (np.abs(u) < 0.03) & (v > 0.83) & (v < 0.88)
        torso = (v >= 0.5) & (v <= 0.845) & (np.abs(u) <= 0.095 + 0.04 * (v - 0.5) / 0.345)
        arm_in = 0.125 + arms_out * (0.8 - v)
        arms = (v >= 0.46) & (v <= 0.83) & (np.abs(u) >= arm_in) & (np.abs(u) <= arm_in + 0.05)
        gap = 0.008 + spread * (0.52 - v)
        legs = (v >= 0) & (v < 0.53) & (np.abs(u) >= gap) & (np.abs(u) <= gap + 0.085)
        return head | neck | torso | arms | legs
    return mask


def person_paint(rng, height):
    skin, hair = _rgb(*SKIN[rng.integers(4)]), _rgb(*((30, 25, 20), (90, 60, 30), (200, 170, 110), (60, 60, 60))[rng.integers(4)])
    shirt, trousers = _rgb(*CLOTHES[rng.integers(len(CLOTHES))]), _rgb(*CLOTHES[rng.integers(len(CLOTHES))])
    shoes = _rgb(35, 30, 30)

    def paint(a, b, ma, mb):
        v = b / height
        out = np.empty((len(a), 3), np.float32)
        out[:] = trousers
        out[v >= 0.5] = shirt
        out[(v >= 0.5) & (v < 0.62) & (np.abs(a / height) > 0.12)] = skin
        out[v >= 0.84] = skin
        out[v >= 0.95] = hair
        out[v < 0.04] = shoes
        return out * (1 + 0.06 * noise2(a * 9, b * 9))[:, None]
    return paint


def make_person(rng, inst, label=PERSON):
    height = rng.uniform(1.55, 1.9)
    faces = [Face("front", label, inst, 0.0, (-0.34 * height, 0.34 * height), (0, height), person_paint(rng, height),
                  mask=person_shape(height, rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.08)))]
    return faces


def make_cyclist(rng, inst_rider, inst_bike, motor):
    """A bicycle or motorcycle seen from behind with its rider (rider class) behind the rear wheel."""
    label = MOTORCYCLE if motor else BICYCLE
    wheel_w, bar = (0.07, 0.36) if motor else (0.035, 0.3)
    top = 1.0 if motor else 1.05
    frame_col = _rgb(*((30, 30, 30), (160, 30, 30), (30, 60, 140), (200, 200, 200))[rng.integers(4)])

    def bike_mask(a, b):
        wheel = (np.abs(a) <= wheel_w) & (b <= 0.66)
        body = (np.abs(a) <= (0.16 if motor else 0.03)) & (b >= 0.3) & (b <= 0.9)
        handle = (np.abs(a) <= bar) & (b >= top - 0.05) & (b <= top)
        stem = (np.abs(a) <= 0.03) & (b >= 0.6) & (b <= top)
        return wheel | body | handle | stem

    def bike_paint(a, b, ma, mb):
        out = np.empty((len(a), 3), np.float32)
        out[:] = frame_col
        out[b < 0.66] = _rgb(25, 25, 25)
        return out
    height = rng.uniform(1.6, 1.85)
    seat = 0.85 if motor else 0.95
    shirt, trousers = _rgb(*CLOTHES[rng.integers(len(CLOTHES))]), _rgb(*CLOTHES[rng.integers(len(CLOTHES))])
    helmet = _rgb(*((220, 220, 220), (30, 30, 30), (200, 40, 40))[rng.integers(3)])

    def rider_mask(a, b):
        head = (a / 0.11) ** 2 + ((b - (seat + 0.7)) / 0.13) ** 2 <= 1.0
        torso = (b >= seat) & (b <= seat + 0.58) & (np.abs(a) <= 0.17 + 0.04 * (b - seat) / 0.58)
        arms = (b >= top - 0.02) & (b <= seat + 0.5) & (np.abs(a) >= bar - 0.08) & (np.abs(a) <= bar)
        legs = (b >= 0.25) & (b <= seat + 0.05) & (np.abs(a) >= 0.06) & (np.abs(a) <= 0.16)
        return head | torso | arms | legs

    def rider_paint(a, b, ma, mb):
        out = np.empty((len(a), 3), np.float32)
        out[:] = trousers
        out[b >= seat + 0.02] = shirt
        out[b >= seat + 0.57] = helmet
        return out * (1 + 0.05 * noise2(a * 9, b * 9))[:, None]
    del height
    return [Face("front", label, inst_bike, 0.0, (-bar, bar), (0, top), bike_paint, mask=bike_mask),
            Face("front", RIDER, inst_rider, 0.3, (-bar, bar), (0, seat + 0.83), rider_paint, mask=rider_mask)]


def make_tree(rng, inst, conifer=False, shrub=False):
    trunk_h = rng.uniform(1.6, 3.0) if not shrub else rng.uniform(0.1, 0.4)
    trunk = flat((85, 65, 45), 0.08, 3.0)
    leaf = _rgb(*((55, 95, 40), (70, 110, 45), (45, 80, 45), (85, 110, 50))[rng.integers(4)])
    off = rng.uniform(0, 200)

    def crown_paint(a, b, ma, mb):
        m = np.maximum(ma, mb)
        n = 0.22 * fade(m, 1.6) * noise2(a * 1.6 + off, b * 1.6) + 0.12 * fade(m, 0.5) * noise2(a * 0.5 + off, b * 0.5 + 9)
        light = 0.85 + 0.25 * np.clip((b - trunk_h) / 4, 0, 1)
        return leaf[None] * (light * (1 + n))[:, None]
    faces = [Face("front", VEGETATION, inst, 0.0, (-0.15, 0.15), (0, trunk_h + 0.5), trunk, min_px=1.0)]
    if conifer:
        h = rng.uniform(5, 12)
        r = rng.uniform(1.2, 2.2)
        base = trunk_h * 0.5

        def cmask(a, b):
            f = (b - base) / h
            return (f >= 0) & (f <= 1) & (np.abs(a) <= r * (1 - f) * (0.85 + 0.15 * np.cos(f * 40 + off)))
        faces.insert(0, Face("front", VEGETATION, inst, -0.05, (-r, r), (base, base + h), crown_paint, mask=cmask))
    else:
        r = rng.uniform(1.3, 3.2) if not shrub else rng.uniform(0.7, 1.6)
        ry = r * rng.uniform(0.8, 1.2) * (0.7 if shrub else 1.0)
        cb = trunk_h + ry * 0.85
        ph = rng.uniform(0, 6.28, 3)

        def cmask(a, b):
            ang = np.arctan2(b - cb, a)
            rho = np.hypot(a / r, (b - cb) / ry)
            edge = 1 + 0.1 * np.sin(3 * ang + ph[0]) + 0.07 * np.sin(5 * ang + ph[1]) + 0.05 * np.sin(8 * ang + ph[2])
            return rho <= edge
        faces.insert(0, Face("front", VEGETATION, inst, -0.05, (-1.25 * r, 1.25 * r), (cb - 1.25 * ry, cb + 1.25 * ry),
                             crown_paint, mask=cmask))
    return faces


POLE_PAINT = flat((120, 122, 128), 0.05, 2.0)


def make_pole(inst, height, width=0.18, arm=0.0, lamp=False):
    """A pole; with `arm` (signed lateral length) a horizontal arm at the top and a lamp head."""
    faces = [Face("front", POLE, inst, 0.0, (-width / 2, width / 2), (0, height), POLE_PAINT, min_px=1.0)]
    if arm:
        faces.append(Face("front", POLE, inst, 0.0, (0, arm), (height - 0.15, height), POLE_PAINT, min_px=1.0))
        if lamp:
            faces.append(Face("front", POLE, inst, -0.02, (arm - 0.45 * np.sign(arm), arm), (height - 0.32, height - 0.1),
                              flat((200, 200, 190), 0.02), min_px=1.0))
    return faces


def make_sign(rng, inst_pole, inst_sign, facing_us=True):
    height = rng.uniform(2.0, 2.6)
    shape = rng.integers(4)
    size = rng.uniform(0.55, 0.8)
    base = ((200, 30, 30), (30, 70, 170), (230, 200, 40), (240, 240, 235))[shape]
    r = size / 2

    def mask(a, b):
        y = b - height - r
        if shape == 0:     # round
            return a * a + y * y <= r * r
        if shape == 1:     # square
            return (np.abs(a) <= r) & (np.abs(y) <= r)
        if shape == 2:     # diamond
            return np.abs(a) + np.abs(y) <= r * 1.2
        return (y <= r * 0.8) & (y >= -r) & (np.abs(a) <= (r * 0.8 - y) * 0.6)   # triangle

    def paint(a, b, ma, mb):
        if not facing_us:
            return np.tile(_rgb(150, 150, 155), (len(a), 1))
        y = b - height - r
        rho = np.maximum(np.abs(a), np.abs(y)) if shape in (1, 2) else np.hypot(a, y)
        inner = box(rho, -1, r * 0.62, np.maximum(ma, mb))[:, None]
        return _rgb(*base)[None] * (1 - inner) + _rgb(235, 235, 230)[None] * inner
    return [Face("front", POLE, inst_pole, 0.02, (-0.05, 0.05), (0, height + r), POLE_PAINT, min_px=1.0),
            Face("front", SIGN, inst_sign, 0.0, (-r * 1.2, r * 1.2), (height - 0.1, height + size + 0.1), paint, mask=mask)]


def make_traffic_light(rng, inst_pole, inst_light, over_road=0.0):
    """A pole with a light box; with over_road (signed lateral length) the box hangs from an arm."""
    height = 3.4 if not over_road else 5.6
    state = rng.integers(3)

    def paint(a, b, ma, mb, b0=0.0):
        out = np.tile(_rgb(35, 35, 35), (len(a), 1))
        for k, col in enumerate(((230, 40, 30), (240, 170, 20), (40, 220, 90))):
            lit = _rgb(*col) if k == state else _rgb(*col) * 0.25
            c = np.clip((0.1 - np.hypot(a - a_c, b - (b0 + 0.75 - 0.27 * k))) / np.maximum(mb, 1e-3) + 0.5, 0, 1)[:, None]
            out = out * (1 - c) + lit[None] * c
        return out
    faces = [Face("front", POLE, inst_pole, 0.02, (-0.09, 0.09), (0, height), POLE_PAINT, min_px=1.0)]
    if over_road:
        a_c = over_road
        faces.append(Face("front", POLE, inst_pole, 0.02, (0, over_road), (height - 0.14, height), POLE_PAINT, min_px=1.0))
        b0 = height - 1.05
    else:
        a_c = 0.0
        b0 = height - 1.0
    faces.append(Face("front", LIGHT, inst_light, 0.0, (a_c - 0.18, a_c + 0.18), (b0, b0 + 0.95),
                      lambda a, b, ma, mb: paint(a, b, ma, mb, b0)))
    return faces


# ----------------------------------------------------------------------------- the world

class DriveWorld:
    """Everything about one sequence that does not depend on the image size: the road, the
    camera path and every object with its trajectory."""

    def __init__(self, seed: int, frames: int):
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
        r_scene, r_curve, r_speed, r_static, r_moving, r_style, r_people, r_lead = streams
        self.frames = frames
        s_end = 1.15 * SCENE[:, 3].max() * frames + Z_FAR + 600.0
        self.sg = np.arange(-400.0, s_end + 4000.0, DS)
        self._scene(r_scene)
        self._road(r_curve)
        self._camera(r_speed)
        self.next_id = 1
        self.static: list[Thing] = []
        self.moving: list[Thing] = []
        self._intersections(r_static)
        self._static_objects(r_static)
        self._moving_objects(r_moving, r_people, r_lead)
        self.static.sort(key=lambda th: th.s)
        self.static_s = np.array([th.s for th in self.static])
        self.max_extent = max([th.s_hi for th in self.static] + [1.0])
        self.brightness = r_style.uniform(0.9, 1.1)
        self.tint = _rgb(*r_style.uniform(0.95, 1.05, 3))
        self.sky_top = _rgb(*r_style.uniform([70, 120, 190], [110, 160, 230]))
        self.sky_horizon = _rgb(*r_style.uniform([180, 200, 215], [215, 225, 235]))
        self.cloudiness = r_style.uniform(0.1, 0.7)

    # -- road --------------------------------------------------------------------------------

    def _scene(self, rng):
        sg = self.sg
        types, bounds = [int(rng.integers(3))], [sg[0]]
        b = rng.uniform(60.0, 260.0)
        while b < sg[-1]:
            bounds.append(b)
            types.append((types[-1] + int(rng.integers(1, 3))) % 3)
            b += rng.uniform(220.0, 480.0)
        bounds.append(sg[-1] + 1)
        onehot = np.zeros((3, len(sg)))
        for k, typ in enumerate(types):
            onehot[typ, (sg >= bounds[k]) & (sg < bounds[k + 1])] = 1.0
        from scipy.ndimage import gaussian_filter1d
        self.w = gaussian_filter1d(onehot, sigma=18.0 / DS, axis=1, mode="nearest")
        self.w /= self.w.sum(0, keepdims=True)
        self.segments = list(zip(bounds[:-1], bounds[1:], types))
        params = self.w.T @ SCENE
        self.hw, self.sw, self.dcam, self.speed, self.curv_scale = params.T

    def _road(self, rng):
        from scipy.ndimage import gaussian_filter1d
        sg = self.sg
        knot_s = np.arange(sg[0], sg[-1] + 60.0, 60.0)
        kappa = np.interp(sg, knot_s, rng.standard_normal(len(knot_s)))
        kappa = gaussian_filter1d(kappa, 25.0 / DS, mode="nearest") * 1.7
        kappa = np.clip(kappa * self.curv_scale, -1 / 60, 1 / 60)
        theta = np.cumsum(kappa) * DS
        self.theta = theta - np.interp(0.0, sg, theta)
        self.Phi = np.cumsum(self.theta) * DS

    def _camera(self, rng):
        from scipy.ndimage import gaussian_filter1d
        t = self.frames
        knot_t = np.arange(0, t + 41, 40)
        knots = np.interp(np.arange(t), knot_t, rng.standard_normal(len(knot_t)))
        jitter = gaussian_filter1d(knots, 10.0, mode="nearest") * 1.5
        s = np.zeros(t)
        for k in range(1, t):
            s[k] = s[k - 1] + np.interp(s[k - 1], self.sg, self.speed) * (1 + 0.08 * jitter[k])
        self.cam_s = s
        self.cam_d = np.interp(s, self.sg, self.dcam)

    def weights(self, s):
        return np.array([np.interp(s, self.sg, w) for w in self.w])

    def min_weight(self, k, s0, s1):
        i0, i1 = np.searchsorted(self.sg, [s0, s1])
        return float(self.w[k, max(i0 - 1, 0):i1 + 1].min())

    def edge(self, s0, s1, with_sidewalk=True):
        """Largest road (+ sidewalk) half width over [s0, s1]: where roadside objects may stand."""
        i0, i1 = np.searchsorted(self.sg, [s0, s1])
        sl = slice(max(i0 - 1, 0), i1 + 1)
        return float((self.hw[sl] + (self.sw[sl] if with_sidewalk else 0)).max())

    def new_id(self):
        self.next_id += 1
        if self.next_id > 65535:
            raise ValueError("synth-drive: more than 65535 objects in one sequence; generate shorter sequences")
        return self.next_id - 1

    def _intersections(self, rng):
        starts, ends = [], []
        s = rng.uniform(20, 120)
        while s < self.sg[-1] - 200:
            if self.min_weight(URBAN, s - 30, s + 40) > 0.9:
                width = rng.uniform(10, 16)
                starts.append(s), ends.append(s + width)
                s += width + rng.uniform(70, 180)
            else:
                s += 20
        self.inter_a, self.inter_b = np.array(starts + [1e12]), np.array(ends + [1e12])

    def in_intersection(self, s, margin=0.0):
        k = np.searchsorted(self.inter_b + margin, s)
        return s >= self.inter_a[np.minimum(k, len(self.inter_a) - 1)] - margin

    # -- static objects ------------------------------------------------------------------------

    def _add(self, faces, s, d):
        self.static.append(Thing(faces, float(s), float(d)))

    def _static_objects(self, rng):
        s_max = self.cam_s[-1] + Z_FAR + 50
        for side in (-1, 1):
            self._buildings(rng, side, s_max)
            self._roadside(rng, side, s_max)
            self._vegetation(rng, side, s_max)
            self._linear(rng, side, s_max)
            self._parked(rng, side, s_max)
        self._median(rng, s_max)
        for a in self.inter_a[:-1]:
            if a > s_max:
                break
            for side in (-1, 1):
                e = self.edge(a - 2, a)
                faces = make_traffic_light(rng, self.new_id(), self.new_id(),
                                           over_road=-side * rng.uniform(2.5, 4.0) if (side == 1 and rng.random() < 0.6) else 0.0)
                self._add(faces, a - 1.5, side * (self.hw[np.searchsorted(self.sg, a)] + 0.6))
                del e

    def _buildings(self, rng, side, s_max):
        s = self.sg[0] + 200
        prev_end, prev_d = -1e9, 0.0
        while s < s_max:
            length = rng.uniform(8, 32)
            if self.min_weight(URBAN, s, s + length) > 0.6 and not self._crosses_intersection(s - 2, s + length + 2):
                setback = (0.0, 0.0, 0.0, 0.6, 1.5, 3.0)[rng.integers(6)]
                d = side * (self.edge(s, s + length) + setback)
                height = rng.uniform(6, 24)
                depth = rng.uniform(10, 20)
                faces = self._building_faces(rng, side, length, height, depth)
                if abs(s - prev_end) < 0.6 and abs(prev_d) <= abs(d):   # hidden behind the previous one
                    faces = faces[:1]
                self._add(faces, s, d)
                prev_end, prev_d = s + length, d
                s += length + (0.0 if rng.random() < 0.7 else rng.uniform(3, 12))
            elif self.min_weight(RURAL, s, s + 30) > 0.7 and rng.random() < 0.08:
                length = rng.uniform(8, 14)
                d = side * (self.edge(s, s + length) + rng.uniform(8, 25))
                self._add(self._building_faces(rng, side, length, rng.uniform(4, 7), rng.uniform(8, 12)), s, d)
                s += length + 20
            else:
                s += 6.0
                if self._crosses_intersection(s, s + 1):
                    s = float(self.inter_b[np.searchsorted(self.inter_b, s)]) + 2.0

    def _crosses_intersection(self, s0, s1):
        k = np.searchsorted(self.inter_b, s0)
        return self.inter_a[k] < s1

    def _building_faces(self, rng, side, length, height, depth):
        inst = self.new_id()
        col = ((200, 180, 150), (155, 85, 65), (135, 135, 140), (210, 205, 195), (200, 165, 100),
               (170, 150, 130), (120, 110, 100), (185, 190, 200))[rng.integers(8)]
        win = ((60, 75, 95), (90, 105, 120), (45, 50, 60))[rng.integers(3)]
        shop = ((70, 60, 50), (50, 70, 90), (150, 60, 50))[rng.integers(3)]
        paint = facade(col, win, rng.uniform(2.9, 3.5), rng.uniform(2.2, 3.2), rng.uniform(0.9, 1.4),
                       rng.uniform(1.2, 1.6), rng.uniform(0, 100), shop)
        sun = 1.0 if side > 0 else 0.85
        return [Face("side", BUILDING, inst, 0.0, (0, length), (0, height), shaded(paint, sun), normal=-side),
                Face("front", BUILDING, inst, 0.0, (0, side * depth), (0, height), shaded(paint, 0.75 * sun))]

    def _roadside(self, rng, side, s_max):
        """Poles, street lamps and signs."""
        s = self.sg[0] + 200 + rng.uniform(0, 30)
        while s < s_max:
            w = self.weights(s)
            if self.in_intersection(s, 3.0):
                s += 5
                continue
            edge = self.edge(s, s)
            hw = float(np.interp(s, self.sg, self.hw))
            r = rng.random()
            if w[URBAN] > 0.5:
                if r < 0.75:
                    self._add(make_pole(self.new_id(), rng.uniform(6.5, 8.0), 0.2, arm=-side * rng.uniform(1.2, 2.0), lamp=True),
                              s, side * (hw + 0.45))
                else:
                    self._add(make_sign(rng, self.new_id(), self.new_id(), facing_us=side > 0), s, side * (hw + 0.5))
                s += rng.uniform(18, 34)
            elif w[RURAL] > 0.5:
                if r < 0.55 and side > 0:
                    self._add(make_pole(self.new_id(), rng.uniform(7.0, 9.0), 0.25), s, side * (edge + rng.uniform(1.5, 3.0)))
                elif r < 0.8:
                    self._add(make_sign(rng, self.new_id(), self.new_id(), facing_us=side > 0), s, side * (edge + 0.8))
                s += rng.uniform(30, 60)
            else:
                if side < 0 and self.min_weight(HIGHWAY, s - 2, s + 2) > 0.97:
                    # lamp posts on the median barrier, lighting both carriageways
                    faces = make_pole(self.new_id(), 10.0, 0.25, arm=2.2, lamp=True)
                    faces += make_pole(faces[0].inst, 10.0, 0.25, arm=-2.2, lamp=True)[1:]
                    self._add(faces, s, 0.0)
                    s += rng.uniform(35, 45)
                    continue
                if r < 0.6 and side > 0:
                    self._add(make_pole(self.new_id(), rng.uniform(9.0, 11.0), 0.25, arm=-side * 2.0, lamp=True),
                              s, side * (edge + 1.4))
                elif r < 0.8:
                    self._add(make_sign(rng, self.new_id(), self.new_id(), facing_us=side > 0), s, side * (edge + 1.6))
                elif r < 0.9 and side > 0 and self.min_weight(HIGHWAY, s - 10, s + 10) > 0.9:
                    self._add(self._gantry(rng, hw), s, 0.0)
                s += rng.uniform(35, 70)

    def _gantry(self, rng, hw):
        """A sign gantry over our carriageway: two posts, a beam and green direction signs."""
        pole_id, sign_id = self.new_id(), self.new_id()
        green = flat((30, 110, 60), 0.02)

        def sign_paint(a, b, ma, mb):
            out = green(a, b, ma, mb)
            text = (periodic_box(a, 0.5, 0.1, 0.25, ma) * periodic_box(b, 0.45, 0.15, 0.15, mb))[:, None]
            return out * (1 - 0.6 * text) + _rgb(230, 230, 230)[None] * 0.6 * text
        faces = [Face("front", POLE, pole_id, 0.0, (0.4, 0.7), (0, 6.4), POLE_PAINT, min_px=1.0),
                 Face("front", POLE, pole_id, 0.0, (hw + 1.0, hw + 1.3), (0, 6.4), POLE_PAINT, min_px=1.0),
                 Face("front", POLE, pole_id, 0.05, (0.4, hw + 1.3), (5.9, 6.3), POLE_PAINT, min_px=1.0),
                 Face("front", SIGN, sign_id, -0.05, (1.0, 4.2), (4.6, 6.6), sign_paint),
                 Face("front", SIGN, sign_id, -0.05, (4.6, 7.8), (4.6, 6.6), sign_paint)]
        return faces

    def _vegetation(self, rng, side, s_max):
        s = self.sg[0] + 200 + rng.uniform(0, 10)
        while s < s_max:
            w = self.weights(s)
            edge = self.edge(s, s)
            hw = float(np.interp(s, self.sg, self.hw))
            if w[URBAN] > 0.5:
                if rng.random() < 0.45 and not self.in_intersection(s, 4):
                    self._add(make_tree(rng, self.new_id()), s, side * (hw + 1.2))
                s += rng.uniform(9, 22)
            elif w[RURAL] > 0.5:
                if rng.random() < 0.7:
                    d = side * (edge + rng.uniform(2.0, 14.0))
                    self._add(make_tree(rng, self.new_id(), conifer=rng.random() < 0.3), s, d)
                s += rng.exponential(9.0) + 2.0
            else:
                r = rng.random()
                if r < 0.45:
                    d = side * (edge + rng.uniform(9.0, 22.0))
                    self._add(make_tree(rng, self.new_id(), conifer=rng.random() < 0.5), s, d)
                elif r < 0.8:     # shrubs on the verge
                    self._add(make_tree(rng, self.new_id(), shrub=True), s, side * (edge + rng.uniform(2.5, 7.0)))
                s += rng.exponential(9.0) + 2.0

    def _linear(self, rng, side, s_max):
        """Things that run along the road: walls, fences, guard rails, hedges, forest edges."""
        for kind in ("guardrail", "fence", "wall", "hedge", "forest"):
            s = self.sg[0] + 200 + rng.uniform(0, 40)
            while s < s_max:
                length = rng.uniform(40, 200) if kind in ("guardrail", "fence", "forest") else rng.uniform(12, 60)
                w = self.weights(s)
                need = {"guardrail": (HIGHWAY, 0.9, 0.9), "fence": (HIGHWAY, 0.7, 0.6), "wall": (None, 0, 0.25),
                        "hedge": (RURAL, 0.5, 0.3), "forest": (RURAL, 0.6, 0.65)}[kind]
                typ, thresh, prob = need
                ok = (self.min_weight(typ, s, s + length) > thresh) if typ is not None else True
                if ok and rng.random() < prob:
                    self._add_linear(rng, kind, side, s, length, w)
                    s += length + rng.uniform(5, 40)
                else:
                    s += rng.uniform(20, 60)

    def _add_linear(self, rng, kind, side, s, length, w):
        edge = self.edge(s, s + length)
        inst = self.new_id()
        if kind == "guardrail":
            paint = flat((175, 178, 180), 0.04, 1.0)

            def mask(a, b):
                return (b >= 0.45) | (np.mod(a, 2.0) < 0.14)
            faces = [Face("side", FENCE, inst, 0.0, (0, length), (0.0, 0.78), shaded(paint, 1.0 if side > 0 else 0.9),
                          mask=mask, normal=-side)]
            self._add(faces, s, side * (edge + 0.5))
            return
        if kind == "fence":
            mesh = flat((120, 128, 112), 0.15, 6.0, 0.1, 0.4)

            def paint(a, b, ma, mb):
                out = mesh(a, b, ma, mb)
                post = periodic_box(a, 3.0, 0.0, 0.1, ma)[:, None]
                return out * (1 - post) + _rgb(90, 90, 92)[None] * post
            height = rng.uniform(1.6, 2.2)
            self._add([Face("side", FENCE, inst, 0.0, (0, length), (0, height), paint, normal=0)], s,
                      side * (edge + rng.uniform(5.0, 8.0)))
            return
        if kind == "wall":
            if w[HIGHWAY] > 0.7:
                height, d = rng.uniform(3.0, 4.2), side * (edge + 3.0)
                col = (150, 150, 145)
            elif w[URBAN] > 0.7:
                height, d = rng.uniform(1.0, 2.2), side * (edge - 0.1)
                col = ((165, 160, 150), (150, 90, 70), (190, 185, 175))[rng.integers(3)]
            else:
                height, d = rng.uniform(0.8, 1.5), side * (edge + rng.uniform(1.5, 4.0))
                col = (140, 135, 120)
            paint = flat(col, 0.08, 2.0, 0.06, 0.3, off=(rng.uniform(0, 99), 0))
            faces = [Face("side", WALL, inst, 0.0, (0, length), (0, height), shaded(paint, 1.0 if side > 0 else 0.88), normal=-side),
                     Face("front", WALL, inst, 0.0, (0, side * 0.3), (0, height), shaded(paint, 0.75))]
            if height < CAM_HEIGHT:
                faces.append(Face("top", WALL, inst, height, (0, length), (0, side * 0.3), shaded(paint, 1.1)))
            self._add(faces, s, d)
            return
        leaf = flat((50, 85, 40), 0.25, 1.2, 0.12, 0.2, off=(rng.uniform(0, 99), 0))
        if kind == "hedge":
            height = rng.uniform(1.0, 1.8)
            off = rng.uniform(0, 99)

            def top(a):
                return height + 0.12 * noise2(a * 0.8 + off, 3.0)
            faces = [Face("side", VEGETATION, inst, 0.0, (0, length), (0, height + 0.15), leaf, top=top, normal=-side),
                     Face("front", VEGETATION, inst, 0.0, (0, side * 0.8), (0, height), shaded(leaf, 0.8))]
            self._add(faces, s, side * (edge + rng.uniform(0.8, 3.0)))
            return
        height = rng.uniform(8, 18)
        off = rng.uniform(0, 99)

        def top(a):
            # a canopy: slow height changes plus crown-sized bumps
            return height * (1 + 0.15 * noise2(a * 0.05 + off, 1.0)) + 1.8 * noise2(a * 0.3 + off, 5.0) \
                + 0.7 * noise2(a * 1.0 + off, 9.0)
        canopy = _rgb(*((42, 72, 38), (52, 82, 40), (38, 66, 44))[rng.integers(3)])

        def paint(a, b, ma, mb):
            m = np.maximum(ma, mb)
            n = 0.22 * fade(m, 0.9) * noise2(a * 0.9 + off, b * 0.9) + 0.15 * fade(m, 0.25) * noise2(a * 0.25 + off, b * 0.25 + 7)
            light = 0.7 + 0.45 * np.clip(b / (height + 3), 0, 1)      # darker under the canopy
            return canopy[None] * (light * (1 + n))[:, None]
        faces = [Face("side", VEGETATION, inst, 0.0, (0, length), (0, height * 1.3 + 3), paint, top=top, normal=-side),
                 Face("front", VEGETATION, inst, 0.0, (0, side * 30.0), (0, height * 1.3 + 3), shaded(paint, 0.85),
                      mask=lambda a, b: b <= top(-a * 0.7))]
        self._add(faces, s, side * (edge + rng.uniform(8.0, 25.0)))

    def _median(self, rng, s_max):
        """A concrete barrier between the carriageways where the road is a highway."""
        s = self.sg[0] + 200
        paint = flat((165, 162, 155), 0.06, 1.5)
        while s < s_max:
            length = 60.0
            if self.min_weight(HIGHWAY, s - 5, s + length + 5) > 0.97:
                inst = self.new_id()
                faces = [Face("side", WALL, inst, -0.25, (0, length), (0, 0.8), shaded(paint, 0.9), normal=-1),
                         Face("side", WALL, inst, 0.25, (0, length), (0, 0.8), paint, normal=1),
                         Face("top", WALL, inst, 0.8, (0, length), (-0.25, 0.25), shaded(paint, 1.1)),
                         Face("front", WALL, inst, 0.0, (-0.25, 0.25), (0, 0.8), shaded(paint, 0.8))]
                # consecutive pieces share a boundary; only the first one's end face can be seen
                if self.static and self.static[-1].faces[0].label == WALL and abs(self.static[-1].s + length - s) < 1e-6:
                    faces = faces[:3]
                self._add(faces, s, 0.0)
            s += length

    def _parked(self, rng, side, s_max):
        s = self.sg[0] + 200
        while s < s_max:
            if self.min_weight(URBAN, s - 2, s + 8) > 0.9 and not self._crosses_intersection(s - 3, s + 8) \
                    and rng.random() < 0.4:
                faces, length = make_car(rng, self.new_id(), "away" if side > 0 else "toward")
                self._add(faces, s, side * 4.9)
                s += length + rng.uniform(0.8, 3.0)
            else:
                s += rng.uniform(3.0, 9.0)

    # -- moving objects ------------------------------------------------------------------------

    def _moving_objects(self, rng, r_people, r_lead):
        T = self.frames
        t = np.arange(T)
        cam_s = self.cam_s
        phase = rng.uniform(0, 6.28, 3)
        v_on = 0.75 * (1 + 0.1 * np.sin(2 * np.pi * t / 230 + phase[0]))
        v_slow = 0.55 * (1 + 0.1 * np.sin(2 * np.pi * t / 310 + phase[1]))
        v_bike = 0.33 * (1 + 0.15 * np.sin(2 * np.pi * t / 170 + phase[2]))
        travelled_on = np.concatenate([[0.0], np.cumsum(v_on[:-1])])
        travelled_slow = np.concatenate([[0.0], np.cumsum(v_slow[:-1])])
        travelled_bike = np.concatenate([[0.0], np.cumsum(v_bike[:-1])])
        s_far = cam_s[-1] + Z_FAR

        # oncoming traffic, inner lane everywhere, outer lane on highways
        for lane in (0, 1):
            s0 = rng.uniform(10, 60)
            while s0 < s_far + travelled_on[-1]:
                w = self.weights(s0)
                s_traj = s0 - travelled_on
                r = rng.random()
                if lane == 1 or w[HIGHWAY] > 0.5:
                    kind = "truck" if r < 0.3 else "car"
                elif w[URBAN] > 0.5:
                    kind = "bus" if r < 0.12 else ("moto" if r < 0.17 else "car")
                else:
                    kind = "truck" if r < 0.1 else ("moto" if r < 0.14 else "car")
                faces, length = self._vehicle(rng, kind, "toward")
                if lane == 0:
                    d_traj = -np.interp(s_traj, self.sg, self.dcam)
                    alive = np.ones(T, bool)
                else:
                    d_traj = -(np.interp(s_traj, self.sg, self.hw) - 2.95)
                    alive = np.interp(s_traj, self.sg, self.w[HIGHWAY]) > 0.85
                self._add_moving(faces, s_traj, d_traj, alive, length)
                mean_gap = 35.0 * w[HIGHWAY] + 60.0 * w[URBAN] + 120.0 * w[RURAL]
                s0 += length + 12.0 + rng.exponential(mean_gap)

        # slower traffic in the outer lane of our carriageway (highway only): overtaken
        s0 = rng.uniform(20, 80)
        while s0 < s_far:
            s_traj = s0 + travelled_slow
            faces, length = self._vehicle(rng, "truck" if rng.random() < 0.4 else "car", "away")
            alive = np.interp(s_traj, self.sg, self.w[HIGHWAY]) > 0.85
            self._add_moving(faces, s_traj, np.interp(s_traj, self.sg, self.hw) - 2.95, alive, length)
            s0 += length + 10 + rng.exponential(40.0)

        # bicycles and motorcycles along the right edge of our lane (not on highways): overtaken
        s0 = rng.uniform(20, 100)
        while s0 < s_far:
            s_traj = s0 + travelled_bike
            motor = rng.random() < 0.25
            faces = make_cyclist(rng, self.new_id(), self.new_id(), motor)
            w_traj = self.weights(s_traj)
            d_traj = w_traj[URBAN] * 3.6 + w_traj[RURAL] * 3.0 + w_traj[HIGHWAY] * 8.2
            alive = w_traj[HIGHWAY] < 0.15
            self._add_moving(faces, s_traj, d_traj, alive, 2.0)
            s0 += 8 + rng.exponential(150.0)

        # a car ahead of us in our lane, slowly pulling away
        if r_lead.random() < 0.6:
            gap = r_lead.uniform(14, 35) + np.cumsum(np.full(T, r_lead.uniform(0.01, 0.05)))
            s_traj = cam_s + gap
            faces, length = self._vehicle(r_lead, "car", "away")
            self._add_moving(faces, s_traj, np.interp(s_traj, self.sg, self.dcam), np.ones(T, bool), length)

        # pedestrians on the sidewalks, walking or standing
        for side in (-1, 1):
            s0 = self.sg[0] + 250
            while s0 < s_far:
                if self.min_weight(URBAN, s0 - 5, s0 + 5) > 0.8:
                    speed = 0.0 if r_people.random() < 0.3 else r_people.choice([-1, 1]) * r_people.uniform(0.06, 0.14)
                    s_traj = s0 + speed * t
                    frac = r_people.uniform(0.2, 0.8)
                    d_traj = side * (np.interp(s_traj, self.sg, self.hw) + frac * np.interp(s_traj, self.sg, self.sw))
                    alive = np.interp(s_traj, self.sg, self.w[URBAN]) > 0.7
                    self._add_moving(make_person(r_people, self.new_id()), s_traj, d_traj, alive, 0.5)
                    s0 += r_people.exponential(9.0) + 1.0
                else:
                    s0 += 10.0

    def _vehicle(self, rng, kind, facing):
        inst = self.new_id()
        if kind == "car":
            return make_car(rng, inst, facing)
        if kind == "moto":
            return make_cyclist(rng, self.new_id(), inst, True), 2.0
        return make_big_vehicle(rng, inst, facing, TRUCK if kind == "truck" else BUS)

    def _add_moving(self, faces, s_traj, d_traj, alive, length):
        """Keep an object only if it never appears or vanishes close to the camera: it must be
        alive whenever it is within sight distance (popping happens where it is a dot)."""
        thing = Thing(faces, np.asarray(s_traj, float), np.asarray(d_traj, float), np.asarray(alive, bool))
        z = thing.s - self.cam_s
        near = (z + thing.s_hi > -2.0) & (z < 120.0 * thing.height)
        if np.any(near & ~thing.alive):
            return
        visible = thing.alive & (z + thing.s_hi > -2.0) & (z < Z_FAR)
        if not visible.any():
            return
        self.moving.append(thing)


# ----------------------------------------------------------------------------- rendering

class _Buffers:
    def __init__(self, height, width):
        self.depth = np.full((height, width), np.inf, np.float32)
        self.label = np.full((height, width), SKY, np.uint8)
        self.inst = np.zeros((height, width), np.uint16)
        self.rgb = np.zeros((height, width, 3), np.float32)
        grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
        self.grid_x, self.grid_y = grid_x, grid_y
        self.src_x, self.src_y = grid_x.copy(), grid_y.copy()


class DriveRenderer:
    """Renders a DriveWorld at one image size, frame by frame."""

    def __init__(self, world: DriveWorld, size, seed: int):
        self.world = world
        self.H, self.W = size
        self.f = 0.6 * (self.H + self.W)
        self.cx = (self.W - 1) / 2.0
        self.yh = 0.42 * (self.H - 1)
        self.h = CAM_HEIGHT
        # depths at which the rays of every column are sampled to intersect vertical side planes
        self.zg = np.geomspace(Z_NEAR * 0.95, Z_FAR * 1.3, int(260 + 3 * self.W))
        self.dz = np.diff(self.zg)
        self.xs = np.arange(self.W, dtype=np.float64)
        self.seed = seed

    # -- primitives ------------------------------------------------------------------------------

    def _commit(self, buf, ys, xs, mask, Z, s_w, d_w, v_w, a, b, ma, mb, face, disp):
        """Z-test the pixels of `mask` in the window (ys, xs) and write label, instance, colour and
        flow source. Every per-pixel argument is a scalar, a row (1, w), a column (h, 1) or (h, w)."""
        region = buf.depth[ys, xs]
        shape = region.shape
        m = (Z < region) & mask if mask is not True else (Z < region)
        if m.shape != shape:
            m = np.broadcast_to(m, shape)
        rows, cols = np.nonzero(m)
        if not len(rows):
            return

        def pick(x):
            if np.ndim(x) == 0:
                return np.full(len(rows), x)
            if x.shape == shape:
                return x[rows, cols]
            if x.shape[1] == 1:
                return x[rows, 0] if x.shape[0] > 1 else np.full(len(rows), x[0, 0])
            return x[0, cols]
        r_abs, c_abs = rows + ys.start, cols + xs.start
        buf.depth[r_abs, c_abs] = pick(Z)
        buf.label[r_abs, c_abs] = face.label
        buf.inst[r_abs, c_abs] = face.inst
        buf.rgb[r_abs, c_abs] = face.paint(pick(a), pick(b), pick(ma), pick(mb))
        if self.prev is not None:
            s_prev = pick(s_w) - disp[0]
            d_prev = pick(d_w) - disp[1]
            z_prev = np.maximum(s_prev - self.prev.s, 0.05)
            buf.src_x[r_abs, c_abs] = self.cx + self.f * (d_prev + self.prev.c(z_prev)) / z_prev
            buf.src_y[r_abs, c_abs] = self.yh + self.f * (self.h - pick(v_w)) / z_prev

    def _front(self, buf, face, so, do, disp):
        view = self.view
        Z = so + face.fixed - view.s
        if Z < Z_NEAR:
            return
        c = float(view.c(Z))
        k = self.f / Z
        x0, x1 = self.cx + k * (do + face.a0 + c), self.cx + k * (do + face.a1 + c)
        y0, y1 = self.yh + k * (self.h - face.b1), self.yh + k * (self.h - face.b0)
        widen_x = widen_y = 1.0
        if face.min_px:
            # a thin pole is drawn at least min_px wide: the widened rectangle is what is
            # rendered, and the flow maps it onto the rectangle widened at frame t-1
            z_prev = max(so - disp[0] + face.fixed - self.prev.s, 0.05) if self.prev is not None else Z
            need, need_prev = face.min_px / k, face.min_px * z_prev / self.f
            if x1 - x0 < face.min_px:
                mid = 0.5 * (x0 + x1)
                x0, x1 = mid - 0.5 * face.min_px, mid + 0.5 * face.min_px
                widen_x = max(need_prev, face.a1 - face.a0) / need
            if y1 - y0 < face.min_px:
                mid = 0.5 * (y0 + y1)
                y0, y1 = mid - 0.5 * face.min_px, mid + 0.5 * face.min_px
                widen_y = max(need_prev, face.b1 - face.b0) / need
        c0, c1 = max(math.ceil(x0), 0), min(math.floor(x1), self.W - 1)
        r0, r1 = max(math.ceil(y0), 0), min(math.floor(y1), self.H - 1)
        if c0 > c1 or r0 > r1:
            return
        xs = np.arange(c0, c1 + 1, dtype=np.float64)
        ys = np.arange(r0, r1 + 1, dtype=np.float64)
        d_w = ((xs - self.cx) / k - c)[None, :]
        v_w = (self.h - (ys - self.yh) / k)[:, None]
        a = d_w - do
        d_flow, v_flow = d_w, v_w
        if widen_x != 1.0:
            mid = do + 0.5 * (face.a0 + face.a1)
            d_flow = mid + (d_w - mid) * widen_x
        if widen_y != 1.0:
            mid = 0.5 * (face.b0 + face.b1)
            v_flow = mid + (v_w - mid) * widen_y
        mask = face.mask(a, v_w) if face.mask is not None else True
        self._commit(buf, slice(r0, r1 + 1), slice(c0, c1 + 1), mask, Z, so + face.fixed, d_flow, v_flow, a, v_w,
                     1.0 / k, 1.0 / k, face, disp)

    def _side(self, buf, face, so, do, disp):
        view, zg = self.view, self.zg
        D = do + face.fixed
        z_lo = max(so + face.a0 - view.s, Z_NEAR)
        z_hi = min(so + face.a1 - view.s, zg[-1])
        if z_hi <= z_lo:
            return
        i0 = max(int(np.searchsorted(zg, z_lo)) - 1, 0)
        i1 = min(int(np.searchsorted(zg, z_hi)) + 1, len(zg) - 1)
        g = self.dray[:, i0:i1 + 1] - D
        g0, g1 = g[:, :-1], g[:, 1:]
        step = g0 - g1
        cross = (g0 * g1 <= 0) & (step != 0)
        if face.normal:
            cross &= step * face.normal > 0
        if not cross.any():
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            zc = zg[None, i0:i1] + g0 / step * self.dz[None, i0:i1]
        valid = cross & (zc >= z_lo) & (zc <= z_hi)
        has = valid.any(1)
        if not has.any():
            return
        cols = np.nonzero(has)[0]
        c0, c1 = int(cols[0]), int(cols[-1])
        first = valid[c0:c1 + 1].argmax(1)
        z_col = zc[np.arange(c0, c1 + 1), first]
        z_col[~has[c0:c1 + 1]] = np.nan
        a = view.s + z_col - so
        with np.errstate(invalid="ignore"):
            top = face.top(a) if face.top is not None else np.full_like(z_col, face.b1)
            y_top = self.yh + self.f * (self.h - top) / z_col
            y_bot = self.yh + self.f * (self.h - face.b0) / z_col
            r0 = max(math.ceil(np.nanmin(y_top)), 0)
            r1 = min(math.floor(np.nanmax(y_bot)), self.H - 1)
            if r0 > r1:
                return
            ys = np.arange(r0, r1 + 1, dtype=np.float64)
            v_w = self.h - (ys[:, None] - self.yh) * z_col[None, :] / self.f
            mask = (v_w >= face.b0) & (v_w <= top[None, :])
            if face.mask is not None:
                mask &= face.mask(a[None, :], v_w)
            zz = np.where(np.isnan(z_col), np.inf, z_col)[None, :]
        ma = (z_col / np.maximum(np.abs(self.xs[c0:c1 + 1] - self.cx), 0.5))[None, :]
        self._commit(buf, slice(r0, r1 + 1), slice(c0, c1 + 1), mask, zz, (view.s + z_col)[None, :], D, v_w,
                     a[None, :], v_w, ma, (z_col / self.f)[None, :], face, disp)

    def _top(self, buf, face, so, do, disp):
        view = self.view
        vp = face.fixed
        if vp >= self.h - 1e-3:
            return
        z_lo = max(so + face.a0 - view.s, Z_NEAR)
        z_hi = so + face.a1 - view.s
        if z_hi <= z_lo:
            return
        K = self.f * (self.h - vp)
        r0 = max(math.ceil(self.yh + K / z_hi), 0)
        r1 = min(math.floor(self.yh + K / z_lo), self.H - 1)
        if r0 > r1:
            return
        ys = np.arange(r0, r1 + 1, dtype=np.float64)
        z_row = K / (ys - self.yh)
        c_row = view.c(z_row)
        xa = self.cx + self.f * (do + face.b0 + c_row) / z_row
        xb = self.cx + self.f * (do + face.b1 + c_row) / z_row
        c0, c1 = max(math.ceil(xa.min()), 0), min(math.floor(xb.max()), self.W - 1)
        if c0 > c1:
            return
        xs = np.arange(c0, c1 + 1, dtype=np.float64)
        d_w = (xs[None, :] - self.cx) * z_row[:, None] / self.f - c_row[:, None]
        b = d_w - do
        a = (view.s + z_row - so)[:, None]
        mask = (b >= face.b0) & (b <= face.b1) & (a >= face.a0) & (a <= face.a1)
        self._commit(buf, slice(r0, r1 + 1), slice(c0, c1 + 1), mask, z_row[:, None], (view.s + z_row)[:, None], d_w,
                     vp, a, b, (z_row ** 2 / K)[:, None], (z_row / self.f)[:, None], face, disp)

    # -- background: sky, far tree line, ground -----------------------------------------------------

    def _sky(self, buf):
        world, view = self.world, self.view
        elev = (self.yh - buf.grid_y) / self.f
        az = (buf.grid_x - self.cx) / self.f + view.theta
        t = np.clip(elev / 0.35, 0, 1)[..., None] ** 0.7
        col = world.sky_horizon * (1 - t) + world.sky_top * t
        cloud = noise2(az * 7 + 11.0, elev * 22) * 0.6 + noise2(az * 19 + 3.0, elev * 55) * 0.3
        cover = np.clip((cloud - 0.55 + world.cloudiness * 0.6) * 2.5, 0, 1) * np.clip(elev / 0.04, 0, 1)
        col = col * (1 - 0.8 * cover[..., None]) + _rgb(240, 240, 242) * 0.8 * cover[..., None]
        buf.rgb[:] = col
        # a distant tree line on the horizon, at infinity (it moves with the camera's heading only)
        far = world.weights(view.s + 400.0)
        amount = far[RURAL] + 0.6 * far[HIGHWAY]
        if amount > 0.02:
            x_az = (self.xs - self.cx) / self.f + view.theta
            line = amount * (0.012 + 0.014 * (noise2(x_az * 25, 3.3) + 1) / 2 + 0.006 * noise2(x_az * 90, 7.7))
            band = (elev >= -0.5 / self.f) & (elev <= line[None, :])
            buf.label[band] = VEGETATION
            buf.depth[band] = 1e6
            tone = 0.9 + 0.1 * noise2(az * 120, elev * 120)
            buf.rgb[band] = (_rgb(60, 85, 60)[None] * tone[band][:, None])
        if self.prev is not None:
            buf.src_x[:] = buf.grid_x + self.f * (view.theta - self.prev.theta)

    def _ground(self, buf):
        world, view = self.world, self.view
        r0 = max(math.ceil(self.yh + 0.05), 0)
        if r0 >= self.H:
            return
        ys = np.arange(r0, self.H, dtype=np.float64)
        z_row = np.minimum(self.f * self.h / (ys - self.yh), 3000.0)
        c_row = view.c(z_row)
        d = (self.xs[None, :] - self.cx) * z_row[:, None] / self.f - c_row[:, None]
        s_row = view.s + z_row
        s = s_row[:, None]
        hw = np.interp(s_row, world.sg, world.hw)[:, None]
        sw = np.interp(s_row, world.sg, world.sw)[:, None]
        w = world.weights(s_row)[:, :, None]
        inter = world.in_intersection(s_row)[:, None]
        ad = np.abs(d)
        road = (ad < hw) | (inter & (ad >= hw))
        sidewalk = ~road & (ad < hw + sw)
        label = np.where(road, ROAD, np.where(sidewalk, SIDEWALK, TERRAIN)).astype(np.uint8)
        mb = (z_row / self.f)[:, None]            # metres per pixel across the road
        ma = (z_row ** 2 / (self.f * self.h))[:, None]   # ... and along it
        m = np.maximum(ma, mb)
        # asphalt
        asphalt = 86 - 14 * w[HIGHWAY]
        n = (0.08 * fade(m, 1.3) * noise2(s * 1.3, d * 1.3) + 0.12 * fade(m, 0.35) * noise2(s * 0.35 + 40, d * 0.35)
             + 0.06 * fade(m, 0.08) * noise2(s * 0.08 + 5, d * 0.08))
        repair = np.clip((noise2(s * 0.045 + 17, d * 0.12 + 3) - 0.35) * 4, 0, 1)    # darker patches of new asphalt
        grey = asphalt * (1 + n) * (1 - 0.18 * repair)
        rgb = np.empty(d.shape + (3,), np.float32)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = grey, grey, grey * 1.04
        # lane markings (box-filtered so they do not shimmer)
        paint = np.zeros(d.shape, np.float32)
        dash9 = periodic_box(s, 9.0, 0.0, 4.0, ma)
        dash12 = periodic_box(s, 12.0, 0.0, 4.0, ma)
        paint += (w[URBAN] + w[RURAL]) * box(d, -0.075, 0.075, mb) * dash9 * ~inter
        paint += w[URBAN] * box(ad, 3.2, 3.32, mb)
        paint += w[RURAL] * box(ad, hw - 0.35, hw - 0.2, mb)
        paint += w[HIGHWAY] * (box(ad, 4.1, 4.25, mb) * dash12 + box(ad, 7.75, 7.9, mb))
        yellow = w[HIGHWAY] * box(ad, 0.55, 0.7, mb)
        a_next = world.inter_a[np.minimum(np.searchsorted(world.inter_a, s_row), len(world.inter_a) - 1)][:, None]
        b_prev = world.inter_b[np.maximum(np.searchsorted(world.inter_b, s_row) - 1, 0)][:, None]
        zebra = ((box(s, a_next - 4.5, a_next - 0.8, ma) + box(s, b_prev + 0.8, b_prev + 4.5, ma))
                 * periodic_box(d + 100, 1.0, 0.0, 0.5, mb) * (ad < hw - 0.3))
        paint = np.clip(paint + zebra, 0, 1) * road
        yellow = np.clip(yellow, 0, 1) * road
        rgb = rgb * (1 - paint - yellow)[..., None] + _rgb(225, 225, 218) * paint[..., None] \
            + _rgb(215, 185, 70) * yellow[..., None]
        # sidewalk tiles and a light curb
        tiles = 1 - 0.22 * np.maximum(periodic_box(s, 1.2, 0, 0.07, ma), periodic_box(d + 100, 1.2, 0, 0.07, mb))
        side_rgb = _rgb(165, 158, 150)[None, None] * (tiles * (1 + 0.05 * fade(m, 2.0) * noise2(s * 2, d * 2)))[..., None]
        curb = box(ad, hw, hw + 0.25, mb)[..., None]
        side_rgb = side_rgb * (1 - curb) + _rgb(195, 195, 190) * curb
        # grass with dry patches
        g = 0.15 * fade(m, 0.9) * noise2(s * 0.9, d * 0.9 + 50) + 0.1 * fade(m, 0.08) * noise2(s * 0.08, d * 0.08 + 9)
        dry = np.clip(noise2(s * 0.03 + 20, d * 0.05) * 1.5 + 0.2 * w[HIGHWAY], 0, 1)[..., None]
        grass = (_rgb(105, 132, 62) * (1 - dry) + _rgb(150, 138, 92) * dry) * (1 + g)[..., None]
        rgb = np.where(road[..., None], rgb, np.where(sidewalk[..., None], side_rgb, grass))
        sl = slice(r0, self.H)
        buf.depth[sl] = np.broadcast_to(z_row[:, None], d.shape)
        buf.label[sl] = label
        buf.inst[sl] = 0
        buf.rgb[sl] = rgb
        if self.prev is not None:
            z_prev = np.maximum(s - self.prev.s, 0.05)
            buf.src_x[sl] = self.cx + self.f * (d + self.prev.c(z_prev)) / z_prev
            buf.src_y[sl] = np.broadcast_to(self.yh + self.f * self.h / z_prev, d.shape)

    # -- a frame ---------------------------------------------------------------------------------

    def _things(self, t):
        world, s = self.world, self.view.s
        i0, i1 = np.searchsorted(world.static_s, [s - world.max_extent - 1.0, s + Z_FAR])
        for thing in world.static[i0:i1]:
            yield thing, thing.s, thing.d, (0.0, 0.0)
        for thing in world.moving:
            if thing.alive[t]:
                so, do = thing.s[t], thing.d[t]
                disp = (so - thing.s[t - 1], do - thing.d[t - 1]) if t > 0 else (0.0, 0.0)
                yield thing, so, do, disp

    def _off_screen(self, thing, do, z_near, z_far):
        """A compact object whose lateral extent projects left (or right) of the image at both its
        nearest and farthest depth is not drawn (a quick reject before its faces)."""
        z = np.array([z_near, z_far])
        c = self.view.c(z)
        x_lo = self.cx + self.f * (do + thing.d_lo + c) / z
        x_hi = self.cx + self.f * (do + thing.d_hi + c) / z
        return bool((x_hi < -1).all() or (x_lo > self.W).all())

    def render(self, t: int) -> dict:
        world = self.world
        self.view = View(world, t)
        self.prev = View(world, t - 1) if t > 0 else None
        buf = _Buffers(self.H, self.W)
        self._sky(buf)
        self._ground(buf)
        self.dray = (self.xs[:, None] - self.cx) / self.f * self.zg[None, :] - self.view.c(self.zg)[None, :]
        for thing, so, do, disp in self._things(t):
            z_near = max(so + thing.s_lo - self.view.s, Z_NEAR)
            z_far = so + thing.s_hi - self.view.s
            if z_far < Z_NEAR or self.f * thing.height / z_near < MIN_PIXELS:
                continue
            if z_far - z_near < 15.0 and self._off_screen(thing, do, z_near, z_far):
                continue
            for face in thing.faces:
                if face.kind == "front":
                    self._front(buf, face, so, do, disp)
                elif face.kind == "side":
                    self._side(buf, face, so, do, disp)
                else:
                    self._top(buf, face, so, do, disp)
        # haze with distance, exposure, sensor noise
        haze = 0.8 * (1 - np.exp(-np.minimum(buf.depth, 1e7) / 420.0))
        haze[np.isinf(buf.depth)] = 0
        rgb = buf.rgb * (1 - haze[..., None]) + world.sky_horizon * haze[..., None]
        rgb = rgb * (world.brightness * world.tint)
        rng = np.random.default_rng([self.seed, t])
        rgb = rgb + rng.normal(0.0, 1.5, rgb.shape)
        flow = np.zeros((2, self.H, self.W), np.float32)
        if self.prev is not None:
            flow[0] = buf.src_x - buf.grid_x
            flow[1] = buf.src_y - buf.grid_y
            # points that were behind the camera at t-1 project far outside; keep them finite in float16
            limit = 4.0 * max(self.H, self.W)
            np.clip(flow, -limit, limit, out=flow)
        return {"label": buf.label, "rgb": np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
                "instance": buf.inst, "flow": flow}


def render_drive(seed: int, frames: int, size):
    """Yields the frames of one synth-drive sequence: dicts of label (H, W) uint8, rgb (H, W, 3)
    uint8, instance (H, W) uint16 and flow (2, H, W) float32."""
    world = DriveWorld(seed, frames)
    renderer = DriveRenderer(world, size, seed)
    for t in range(frames):
        yield renderer.render(t)
