"""synth-dance: one articulated figure dancing in front of a static camera, labelled with the 24
DensePose body parts (+ background), with clothing-coloured RGB, an instance id and exact flow.

The figure is a small 3D skeleton (pelvis, torso, head, arms, legs) posed from joint angles and
turned by a yaw angle, projected orthographically. Every body part is drawn as a 2D shape with its
own transform: limbs are capsules between their projected joints (their length shrinks when a limb
points at the camera), torso and head are shapes in an affine frame. The backward flow of a pixel
maps its local part coordinates through the part's transform of the previous frame, so it is exact
for the rendered shapes; the background is static (zero flow).

The dance is a chain of randomly drawn "moves" (arm waves, pumps, side steps, kicks, squats, sways,
claps, turns, spins, jumps) of a few dozen frames each. Each move drives the joint angles with
sinusoids of its own tempo, amplitudes and phases; consecutive moves cross-fade, so the motion is
smooth and never repeats. Turning around swaps front/back labels (torso, legs) and left/right
halves of the head.
"""
from __future__ import annotations

import math

import numpy as np

from data.synthetic.drive import fade, noise2

CLASSES = ("background", "torso back", "torso front", "right hand", "left hand", "left foot", "right foot",
           "upper leg right back", "upper leg left back", "upper leg right front", "upper leg left front",
           "lower leg right back", "lower leg left back", "lower leg right front", "lower leg left front",
           "upper arm left inside", "upper arm right inside", "upper arm left outside", "upper arm right outside",
           "lower arm left inside", "lower arm right inside", "lower arm left outside", "lower arm right outside",
           "head right", "head left")
PALETTE = ((0, 0, 0), (30, 60, 160), (70, 120, 235), (235, 205, 20), (255, 140, 0), (140, 80, 20),
           (205, 125, 60), (0, 120, 55), (0, 85, 110), (45, 200, 90), (35, 175, 210), (120, 145, 0),
           (70, 65, 150), (185, 225, 60), (125, 125, 245), (230, 55, 55), (200, 35, 140), (145, 20, 20),
           (115, 20, 85), (255, 130, 125), (245, 115, 215), (190, 75, 60), (170, 65, 175), (250, 225, 185),
           (195, 165, 125))
FPS = 15

TORSO = {True: 2, False: 1}                 # facing the camera -> front
HAND = {-1: 3, 1: 4}                         # side -1 = the figure's right, +1 = its left
FOOT = {1: 5, -1: 6}
UPPER_LEG = {(-1, False): 7, (1, False): 8, (-1, True): 9, (1, True): 10}
LOWER_LEG = {(-1, False): 11, (1, False): 12, (-1, True): 13, (1, True): 14}
UPPER_ARM = {(1, True): 15, (-1, True): 16, (1, False): 17, (-1, False): 18}     # (side, inside)
LOWER_ARM = {(1, True): 19, (-1, True): 20, (1, False): 21, (-1, False): 22}
HEAD = {-1: 23, 1: 24}

# body proportions in units of body height
UPPER_ARM_LEN, FOREARM_LEN, HAND_LEN = 0.155, 0.14, 0.07
THIGH_LEN, SHIN_LEN, FOOT_LEN = 0.235, 0.235, 0.085
SHOULDER_X, SHOULDER_Y, HIP_X, NECK_Y = 0.105, 0.265, 0.062, 0.30
ANKLE_H = 0.04
TORSO_PROFILE = np.array([[-0.04, 0.086], [0.0, 0.094], [0.12, 0.08], [0.22, 0.104], [0.265, 0.118],
                          [0.29, 0.09], [0.30, 0.04], [0.335, 0.033]])


def smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# ----------------------------------------------------------------------------- choreography

DOFS = ("x", "lift", "yaw", "sway", "lean", "head_tilt",
        "arm_abd_l", "arm_fwd_l", "elbow_abd_l", "elbow_fwd_l", "arm_abd_r", "arm_fwd_r", "elbow_abd_r", "elbow_fwd_r",
        "hip_abd_l", "hip_fwd_l", "knee_l", "hip_abd_r", "hip_fwd_r", "knee_r")


class Move:
    """Joint angles as functions of time: base + sum of sinusoids, drawn at random for one style."""

    def __init__(self, rng, style, start, duration, prev_yaw, prev_x):
        self.start, self.duration, self.style = start, duration, style
        tempo = rng.uniform(0.35, 0.85) / FPS          # beats per frame
        self.terms = {k: [] for k in DOFS}
        self.base = {k: 0.0 for k in DOFS}
        b, add = self.base, self._add
        sym = rng.choice([1.0, -1.0])                   # arms/legs in phase or alternating
        # a resting pose with small idle motion that every style modifies
        for s in "lr":
            b[f"arm_abd_{s}"] = rng.uniform(0.1, 0.5)
            b[f"arm_fwd_{s}"] = rng.uniform(-0.1, 0.3)
            b[f"elbow_fwd_{s}"] = rng.uniform(0.1, 0.6)
            b[f"hip_abd_{s}"] = rng.uniform(0.02, 0.12)
            b[f"knee_{s}"] = rng.uniform(0.05, 0.25)
            add(rng, f"arm_abd_{s}", 0.08, tempo)
        add(rng, "sway", rng.uniform(0.02, 0.08), tempo)
        add(rng, "head_tilt", rng.uniform(0.03, 0.12), tempo)
        for s in "lr":
            add(rng, f"knee_{s}", rng.uniform(0.05, 0.2), 2 * tempo, phase=0.0)
        yaw_target = round(prev_yaw / math.pi) * math.pi
        back_now = math.cos(yaw_target) < 0
        # turn around now and then, and do not stay turned away for long
        if style != "spin" and rng.random() < (0.6 if back_now else 0.15):
            yaw_target += math.pi * rng.choice([-1, 1])
        b["yaw"] = yaw_target + rng.uniform(-0.45, 0.45)
        b["x"] = float(np.clip(prev_x + rng.uniform(-0.2, 0.2), -0.25, 0.25))
        b["lean"] = rng.uniform(-0.05, 0.12)
        if style == "wave":
            for k, s in enumerate("lr"):
                b[f"arm_abd_{s}"] = rng.uniform(0.6, 2.0)
                add(rng, f"arm_abd_{s}", rng.uniform(0.3, 0.8), tempo, phase=0.0 if k == 0 or sym > 0 else math.pi)
                b[f"elbow_abd_{s}"] = rng.uniform(0.0, 0.8)
                add(rng, f"elbow_abd_{s}", rng.uniform(0.3, 0.9), tempo, phase=rng.uniform(0, 6.3))
        elif style == "pump":
            for s in "lr":
                b[f"arm_abd_{s}"] = rng.uniform(1.6, 2.6)
                add(rng, f"arm_abd_{s}", rng.uniform(0.3, 0.6), tempo, phase=0.0)
                b[f"elbow_abd_{s}"] = rng.uniform(0.2, 1.2)
                add(rng, f"knee_{s}", rng.uniform(0.2, 0.4), tempo, phase=0.0)
        elif style == "step":
            add(rng, "x", rng.uniform(0.06, 0.14), tempo / 2, phase=0.0)
            for k, s in enumerate("lr"):
                add(rng, f"hip_abd_{s}", rng.uniform(0.1, 0.25), tempo, phase=0.0 if k == 0 else math.pi)
                add(rng, f"arm_fwd_{s}", rng.uniform(0.2, 0.5), tempo, phase=0.0 if k == 0 else math.pi)
                add(rng, f"knee_{s}", rng.uniform(0.1, 0.3), tempo, phase=0.0 if k == 0 else math.pi)
        elif style == "kick":
            s = "lr"[rng.integers(2)]
            b[f"hip_fwd_{s}"] = rng.uniform(0.3, 0.6)
            add(rng, f"hip_fwd_{s}", rng.uniform(0.3, 0.6), tempo, phase=0.0)
            add(rng, f"knee_{s}", rng.uniform(0.2, 0.6), tempo, phase=1.2)
            for o in "lr":
                b[f"arm_abd_{o}"] = rng.uniform(0.5, 1.4)
        elif style == "squat":
            for s in "lr":
                b[f"knee_{s}"] = rng.uniform(0.3, 0.6)
                add(rng, f"knee_{s}", rng.uniform(0.25, 0.5), tempo, phase=0.0)
                b[f"hip_abd_{s}"] = rng.uniform(0.15, 0.3)
                b[f"arm_fwd_{s}"] = rng.uniform(0.6, 1.3)
                add(rng, f"arm_fwd_{s}", rng.uniform(0.2, 0.4), tempo, phase=0.0)
        elif style == "sway":
            add(rng, "sway", rng.uniform(0.15, 0.28), tempo, phase=0.0)
            add(rng, "x", rng.uniform(0.03, 0.07), tempo, phase=0.0)
            for k, s in enumerate("lr"):
                b[f"arm_abd_{s}"] = rng.uniform(2.0, 2.7)
                b[f"elbow_abd_{s}"] = rng.uniform(0.0, 0.5)
                add(rng, f"arm_abd_{s}", rng.uniform(0.25, 0.5), tempo, phase=0.0 if k == 0 else math.pi)
                add(rng, f"knee_{s}", rng.uniform(0.15, 0.3), tempo, phase=0.0 if k == 0 else math.pi)
        elif style == "clap":
            for s in "lr":
                b[f"arm_fwd_{s}"] = rng.uniform(0.8, 1.4)
                b[f"arm_abd_{s}"] = rng.uniform(0.2, 0.5)
                add(rng, f"arm_abd_{s}", rng.uniform(0.2, 0.5), tempo, phase=0.0)
                b[f"elbow_fwd_{s}"] = rng.uniform(0.3, 0.9)
        elif style == "spin":
            self.spin = rng.choice([-1, 1]) * 2 * math.pi
            for s in "lr":
                b[f"arm_abd_{s}"] = rng.uniform(1.2, 1.7)
        elif style == "jump":
            self.jump = (rng.uniform(0.04, 0.09), tempo)
            for s in "lr":
                b[f"arm_abd_{s}"] = rng.uniform(0.8, 2.6)
                add(rng, f"knee_{s}", rng.uniform(0.2, 0.4), tempo, phase=math.pi / 2)
        # a little individual randomness on every joint so no two moves look alike
        for k in DOFS:
            if k.startswith(("arm", "elbow", "hip", "knee")):
                add(rng, k, rng.uniform(0.0, 0.12), tempo * rng.choice([0.5, 1.0, 2.0]))

    def _add(self, rng, dof, amp, freq, phase=None):
        self.terms[dof].append((amp, freq, rng.uniform(0, 2 * math.pi) if phase is None else phase))

    def evaluate(self, t):
        """All joint angles at frames t (array), as a dict of arrays."""
        local = t - self.start
        out = {}
        for k in DOFS:
            v = np.full(t.shape, self.base[k])
            for amp, freq, phase in self.terms[k]:
                v = v + amp * np.sin(2 * math.pi * freq * local + phase)
            out[k] = v
        if self.style == "spin":
            out["yaw"] = out["yaw"] + self.spin * smoothstep(local / self.duration)
        if self.style == "jump":
            amp, freq = self.jump
            out["lift"] = out["lift"] + amp * np.maximum(np.sin(2 * math.pi * freq * local), 0) ** 2
        return out

    def end_yaw(self):
        return self.base["yaw"] + (self.spin if self.style == "spin" else 0.0)


STYLES = ("wave", "pump", "step", "kick", "squat", "sway", "clap", "spin", "jump")
STYLE_WEIGHTS = np.array([3, 2, 3, 2, 2, 2, 2, 1, 1], float)


def choreography(rng, frames):
    """Joint-angle tracks (dict of (T,) arrays) for `frames` frames."""
    t = np.arange(frames, dtype=np.float64)
    tracks = {k: np.zeros(frames) for k in DOFS}
    weight_sum = np.zeros(frames)
    start, yaw, x, blend = -10, rng.uniform(-0.3, 0.3), 0.0, 8
    prev_style = None
    while start < frames:
        p = STYLE_WEIGHTS.copy()
        if prev_style is not None:
            p[STYLES.index(prev_style)] *= 0.2
        style = STYLES[rng.choice(len(STYLES), p=p / p.sum())]
        duration = int(rng.integers(24, 64))
        move = Move(rng, style, start, duration, yaw, x)
        # trapezoid weight: fades in over `blend` frames, holds, fades out into the next move
        w = smoothstep((t - start + blend) / blend) * smoothstep((start + duration + blend - t) / blend)
        values = move.evaluate(t)
        for k in DOFS:
            tracks[k] += w * values[k]
        weight_sum += w
        yaw, x = move.end_yaw(), move.base["x"]
        prev_style = style
        start += duration
    for k in DOFS:
        tracks[k] /= np.maximum(weight_sum, 1e-9)
    return tracks


# ----------------------------------------------------------------------------- skeleton

def _limb_dir(abd, fwd, side):
    """Unit direction in figure coordinates (x: the figure's left, y: up, z: its front)."""
    return np.array([side * np.sin(abd) * np.cos(fwd), -np.cos(abd) * np.cos(fwd), np.sin(fwd)])


def pose(tracks, t):
    """3D joints (figure coordinates, pelvis-relative) and the figure's yaw/position at frame t."""
    g = {k: float(v[t]) for k, v in tracks.items()}
    sway, lean = g["sway"], g["lean"]
    up = np.array([np.sin(sway), np.cos(sway) * np.cos(lean), np.sin(lean)])
    lateral = np.array([np.cos(sway), -np.sin(sway), 0.0])
    neck = up * NECK_Y
    j = {"pelvis": np.zeros(3), "neck": neck, "up": up, "lateral": lateral}
    for side, s in ((1, "l"), (-1, "r")):
        shoulder = up * SHOULDER_Y + lateral * side * SHOULDER_X
        abd = np.clip(g[f"arm_abd_{s}"] + side * sway, -0.3, 3.0)
        fwd = np.clip(g[f"arm_fwd_{s}"], -0.6, 1.5)
        elbow = shoulder + UPPER_ARM_LEN * _limb_dir(abd, fwd, side)
        abd2 = np.clip(abd + np.clip(g[f"elbow_abd_{s}"], -0.2, 2.0), -0.3, 3.1)
        fwd2 = np.clip(fwd + np.clip(g[f"elbow_fwd_{s}"], 0.0, 2.0), -0.6, 1.55)
        fore = _limb_dir(abd2, fwd2, side)
        wrist = elbow + FOREARM_LEN * fore
        j[f"shoulder_{s}"], j[f"elbow_{s}"], j[f"wrist_{s}"] = shoulder, elbow, wrist
        j[f"fingers_{s}"] = wrist + HAND_LEN * fore
        hip = lateral * side * HIP_X
        habd = np.clip(g[f"hip_abd_{s}"], -0.1, 0.6)
        hfwd = np.clip(g[f"hip_fwd_{s}"], -0.3, 1.4)
        knee = hip + THIGH_LEN * _limb_dir(habd, hfwd, side)
        kfwd = hfwd - np.clip(g[f"knee_{s}"], 0.0, 1.8)
        ankle = knee + SHIN_LEN * _limb_dir(habd, kfwd, side)
        toe_dir = np.array([side * 0.3, -0.35, 1.0])
        j[f"hip_{s}"], j[f"knee_{s}"], j[f"ankle_{s}"] = hip, knee, ankle
        j[f"toe_{s}"] = ankle + FOOT_LEN * toe_dir / np.linalg.norm(toe_dir)
    # the lower ankle stands on the floor (plus the jump lift)
    j["height"] = ANKLE_H - min(j["ankle_l"][1], j["ankle_r"][1]) + g["lift"]
    j["yaw"], j["x"], j["head_tilt"] = g["yaw"], g["x"], g["head_tilt"]
    return j


# ----------------------------------------------------------------------------- rendering

class Part:
    """A body part for one frame: how local coordinates map to the screen, its depth and labels."""
    __slots__ = ("kind", "name", "side", "A", "B", "r0", "r1", "M", "origin", "depth", "facing", "inside")


class DanceRenderer:
    def __init__(self, seed: int, frames: int, size):
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
        style = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
        self.H, self.W = size
        self.seed = seed
        self.tracks = choreography(rng, frames)
        self.scale = 0.8 * self.H
        self.floor = 0.94 * (self.H - 1)
        self.tex_amp = 0.08 * float(fade(1.0 / self.scale, 8.0))     # fabric texture, faded where it would alias
        self.cx = (self.W - 1) / 2.0
        self._style(style)
        grid_y, grid_x = np.mgrid[0:self.H, 0:self.W].astype(np.float32)
        self.grid_x, self.grid_y = grid_x, grid_y
        self.background = self._background(style)
        self.prev_parts = None

    # -- appearance ------------------------------------------------------------------------

    def _style(self, rng):
        skins = ((240, 205, 175), (225, 180, 145), (190, 140, 100), (140, 95, 65), (95, 65, 45))
        clothes = ((200, 40, 45), (40, 70, 160), (240, 240, 235), (30, 30, 35), (60, 140, 80), (230, 190, 50),
                   (150, 60, 160), (240, 130, 40), (90, 170, 210), (120, 120, 125), (210, 110, 150), (70, 50, 40))
        pick = rng.permutation(len(clothes))
        self.skin = np.array(skins[rng.integers(len(skins))], np.float32)
        self.shirt = np.array(clothes[pick[0]], np.float32)
        self.trousers = np.array(clothes[pick[1]], np.float32) * rng.uniform(0.7, 1.0)
        self.shoes = np.array(((30, 30, 30), (240, 240, 240), (120, 70, 40), (180, 40, 40))[rng.integers(4)], np.float32)
        self.hair = np.array(((25, 20, 18), (80, 50, 30), (190, 150, 90), (120, 40, 25), (70, 70, 72))[rng.integers(5)], np.float32)
        self.sleeves = rng.choice(["none", "short", "long"], p=[0.2, 0.45, 0.35])
        self.shorts = rng.random() < 0.3
        self.stripes = rng.random() < 0.4
        self.stripe_period = rng.uniform(0.07, 0.12)
        self.wall = rng.uniform([120, 110, 100], [235, 225, 215]).astype(np.float32)
        self.floor_col = rng.uniform([70, 55, 40], [180, 160, 140]).astype(np.float32)
        self.tex_off = rng.uniform(0, 200, 4)

    def _background(self, rng):
        H, W = self.H, self.W
        u, v = self.grid_x / self.scale, self.grid_y / self.scale
        o = self.tex_off
        wall = self.wall[None, None] * (0.92 + 0.06 * noise2(u * 3 + o[0], v * 3)[..., None]
                                        + 0.04 * noise2(u * 11 + o[1], v * 11)[..., None])
        wall *= (0.85 + 0.15 * (1 - np.abs(u * self.scale - self.cx) / max(W, 1)))[..., None]
        planks = 1 - 0.12 * (np.abs(((u * 5 + o[2]) % 1.0) - 0.5) < 0.02)[..., None]
        floor = self.floor_col[None, None] * (0.9 + 0.08 * noise2(u * 2 + o[3], v * 20)[..., None]) * planks
        edge = np.clip((self.grid_y - (self.floor - 0.16 * self.scale)) / max(0.01 * self.scale, 0.5), 0, 1)[..., None]
        base = wall * (1 - edge) + floor * edge
        # soft vignette so the frame does not look flat
        r = np.hypot((self.grid_x - self.cx) / W, (self.grid_y - H / 2) / H)
        return (base * (1 - 0.25 * r[..., None] ** 2)).astype(np.float32)

    # -- geometry --------------------------------------------------------------------------

    def _project(self, p, j):
        """Figure coordinates -> screen (x, y) pixels and depth (towards the camera)."""
        yaw = j["yaw"]
        x = p[0] * math.cos(yaw) + p[2] * math.sin(yaw)
        depth = -p[0] * math.sin(yaw) + p[2] * math.cos(yaw)
        sx = self.cx + self.scale * (j["x"] + x)
        sy = self.floor - self.scale * (j["height"] + p[1])
        return np.array([sx, sy]), depth

    def _parts(self, t):
        j = pose(self.tracks, t)
        yaw = j["yaw"]
        facing = math.cos(yaw) >= 0
        parts = []
        S = self.scale

        def limb(name, side, a, b, r0, r1, bias=0.0):
            A, za = self._project(j[a], j)
            B, zb = self._project(j[b], j)
            p = Part()
            p.kind, p.name, p.side = "limb", name, side
            p.A, p.B, p.r0, p.r1 = A, B, r0 * S, r1 * S
            p.depth = 0.5 * (za + zb) + bias
            p.facing = facing
            parts.append(p)
            return p
        # torso: an affine frame; its lateral axis shrinks when the figure turns sideways
        c, s = math.cos(yaw), math.sin(yaw)
        width = math.copysign(math.sqrt(c * c + (0.55 * s) ** 2), c if c != 0 else 1.0)
        up_screen = np.array([self._project(j["up"], j)[0][0] - self._project(np.zeros(3), j)[0][0],
                              -(j["up"][1]) * S])
        lat = np.array([j["lateral"][0] * width, -j["lateral"][1]]) * S
        origin, _ = self._project(j["pelvis"], j)
        torso = Part()
        torso.kind, torso.name, torso.side = "torso", "torso", 0
        torso.origin = origin
        torso.M = np.array([[lat[0], up_screen[0]], [lat[1], up_screen[1]]])
        torso.depth = 0.09 * max(abs(c), 0.6)
        torso.facing = facing
        parts.append(torso)
        # head: a tilted ellipse above the neck
        neck, _ = self._project(j["neck"], j)
        tilt = j["head_tilt"] + math.atan2(up_screen[0], -up_screen[1])
        head = Part()
        head.kind, head.name, head.side = "head", "head", 0
        head.origin = neck
        ct, st = math.cos(tilt), math.sin(tilt)
        head.M = np.array([[ct, st], [st, -ct]]) * S     # local (lateral, up) -> screen
        head.depth = 0.05
        head.facing = facing
        head.inside = 0.062 * math.sin(yaw) * (1 if facing else -1)   # where the face's midline is
        parts.append(head)
        centre = origin + 0.5 * (neck - origin)
        for side, k in ((1, "l"), (-1, "r")):
            lean = 0.002 * side      # ties between left and right resolve the same way every frame
            for p in (limb("upper_arm", side, f"shoulder_{k}", f"elbow_{k}", 0.034, 0.029, lean),
                      limb("lower_arm", side, f"elbow_{k}", f"wrist_{k}", 0.028, 0.022, 0.001 + lean)):
                # the half of the arm that faces the body is "inside"
                axis = p.B - p.A
                normal = np.array([-axis[1], axis[0]])
                p.inside = 1.0 if normal @ (centre - 0.5 * (p.A + p.B)) > 0 else -1.0
            limb("hand", side, f"wrist_{k}", f"fingers_{k}", 0.025, 0.021, 0.002 + lean)
            limb("upper_leg", side, f"hip_{k}", f"knee_{k}", 0.056, 0.042, -0.01 + lean)
            limb("lower_leg", side, f"knee_{k}", f"ankle_{k}", 0.04, 0.03, lean)
            limb("foot", side, f"ankle_{k}", f"toe_{k}", 0.026, 0.022, 0.001 + lean)
        return parts

    # -- local coordinates and their inverse ---------------------------------------------------

    @staticmethod
    def _limb_local(p, X, Y):
        axis = p.B - p.A
        length = max(float(np.hypot(*axis)), 1e-6)
        e = axis / length
        n = np.array([-e[1], e[0]])
        dx, dy = X - p.A[0], Y - p.A[1]
        along = dx * e[0] + dy * e[1]
        across = dx * n[0] + dy * n[1]
        return along, across, length

    @staticmethod
    def _limb_source(p_prev, along, across, length):
        """Where a limb point (along/across in pixels at frame t) was at t-1: the shaft stretches
        with the limb, the round caps keep their pixel offsets from their joint."""
        axis = p_prev.B - p_prev.A
        length_prev = max(float(np.hypot(*axis)), 1e-6)
        e = axis / length_prev
        n = np.array([-e[1], e[0]])
        a_prev = np.where(along < 0, along, np.where(along > length, length_prev + along - length,
                                                      along * (length_prev / length)))
        return p_prev.A[0] + a_prev * e[0] + across * n[0], p_prev.A[1] + a_prev * e[1] + across * n[1]

    def _bbox(self, p):
        if p.kind == "limb":
            r = max(p.r0, p.r1) + 1
            lo = np.minimum(p.A, p.B) - r
            hi = np.maximum(p.A, p.B) + r
        else:
            extent = (-0.13, 0.13, -0.05, 0.34) if p.kind == "torso" else (-0.07, 0.07, 0.0, 0.17)
            local = np.array([[extent[0], extent[2]], [extent[1], extent[2]], [extent[0], extent[3]], [extent[1], extent[3]]])
            corners = local @ p.M.T + p.origin
            lo, hi = corners.min(0) - 1, corners.max(0) + 1
        x0, y0 = max(math.ceil(lo[0]), 0), max(math.ceil(lo[1]), 0)
        x1, y1 = min(math.floor(hi[0]), self.W - 1), min(math.floor(hi[1]), self.H - 1)
        return x0, x1, y0, y1

    def _draw(self, buf, p, p_prev, index):
        x0, x1, y0, y1 = self._bbox(p)
        if x0 > x1 or y0 > y1:
            return
        X = self.grid_x[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
        Y = self.grid_y[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
        if p.kind == "limb":
            along, across, length = self._limb_local(p, X, Y)
            f = np.clip(along / length, 0, 1)
            radius = p.r0 + (p.r1 - p.r0) * f
            shaft = (along >= 0) & (along <= length) & (np.abs(across) <= radius)
            mask = shaft | (np.hypot(along, across) <= p.r0) | (np.hypot(along - length, across) <= p.r1)
            local = (along, across, length)
        else:
            inv = np.linalg.inv(p.M)
            dx, dy = X - p.origin[0], Y - p.origin[1]
            lx = inv[0, 0] * dx + inv[0, 1] * dy
            ly = inv[1, 0] * dx + inv[1, 1] * dy
            if p.kind == "torso":
                half = np.interp(ly, TORSO_PROFILE[:, 0], TORSO_PROFILE[:, 1], left=-1, right=-1)
                mask = np.abs(lx) <= half
            else:
                mask = (lx / 0.062) ** 2 + ((ly - 0.085) / 0.078) ** 2 <= 1.0
            local = (lx, ly)
        region = buf["depth"][y0:y1 + 1, x0:x1 + 1]
        m = mask & (p.depth > region)
        if not m.any():
            return
        region[m] = p.depth
        label = self._labels(p, local, m)
        buf["label"][y0:y1 + 1, x0:x1 + 1][m] = label
        buf["instance"][y0:y1 + 1, x0:x1 + 1][m] = 1
        buf["rgb"][y0:y1 + 1, x0:x1 + 1][m] = self._paint(p, local, m, label)
        if p_prev is not None:
            if p.kind == "limb":
                sx, sy = self._limb_source(p_prev, local[0][m], local[1][m], local[2])
            else:
                lx, ly = local[0][m], local[1][m]
                sx = p_prev.origin[0] + p_prev.M[0, 0] * lx + p_prev.M[0, 1] * ly
                sy = p_prev.origin[1] + p_prev.M[1, 0] * lx + p_prev.M[1, 1] * ly
            buf["src_x"][y0:y1 + 1, x0:x1 + 1][m] = sx
            buf["src_y"][y0:y1 + 1, x0:x1 + 1][m] = sy

    def _labels(self, p, local, m):
        if p.kind == "torso":
            return TORSO[p.facing]
        if p.kind == "head":
            screen_right = local[0][m] > p.inside
            # facing the camera the figure's left is on the screen's right
            left = screen_right if p.facing else ~screen_right
            return np.where(left, HEAD[1], HEAD[-1])
        if p.name in ("hand", "foot"):
            return (HAND if p.name == "hand" else FOOT)[p.side]
        if p.name in ("upper_leg", "lower_leg"):
            return (UPPER_LEG if p.name == "upper_leg" else LOWER_LEG)[(p.side, p.facing)]
        table = UPPER_ARM if p.name == "upper_arm" else LOWER_ARM
        inside = (local[1][m] * p.inside) > 0
        return np.where(inside, table[(p.side, True)], table[(p.side, False)])

    def _paint(self, p, local, m, label):
        n = int(m.sum())
        if p.kind == "limb":
            along, across = local[0][m], local[1][m]
            radius = max(p.r0, p.r1)
            shade = 0.72 + 0.33 * np.sqrt(np.clip(1 - (across / radius) ** 2, 0, 1))
            frac = along / max(local[2], 1e-6)
            name = p.name
            if name in ("hand",):
                col = np.tile(self.skin, (n, 1))
            elif name == "foot":
                col = np.tile(self.shoes, (n, 1))
            elif name == "upper_arm":
                col = np.tile(self.skin if self.sleeves == "none" else self.shirt, (n, 1))
                if self.sleeves == "short":
                    col[frac > 0.65] = self.skin
            elif name == "lower_arm":
                col = np.tile(self.shirt if self.sleeves == "long" else self.skin, (n, 1))
            elif name == "upper_leg":
                col = np.tile(self.trousers, (n, 1))
            else:
                col = np.tile(self.skin if self.shorts else self.trousers, (n, 1))
                if not self.shorts:
                    col[frac > 0.9] = self.shoes * 0.9 + self.trousers * 0.1
            # a fabric texture attached to the part, so the motion shows in the RGB
            tex = 1 + self.tex_amp * noise2(along / self.scale * 8 + 17 * p.side, across / self.scale * 8)
            return col * (shade * tex)[:, None]
        lx, ly = local[0][m], local[1][m]
        if p.kind == "torso":
            col = np.tile(self.shirt, (n, 1))
            if self.stripes:     # soft (sinusoidal) stripes: they move with the torso without aliasing
                stripe = (0.5 + 0.5 * np.sin(2 * np.pi * ly / self.stripe_period))[:, None]
                stripe = stripe * float(fade(1.0 / self.scale, 1.0 / self.stripe_period))
                col = col * (1 - 0.35 * stripe) + 255 * 0.35 * (self.shirt.mean() < 128) * stripe
            col[ly < 0.045] = self.trousers
            if self.sleeves == "none":
                col[(ly > 0.2) & (np.abs(lx) > 0.08)] = self.skin
            col[ly > 0.29] = self.skin
            shade = 0.78 + 0.27 * np.sqrt(np.clip(1 - (lx / 0.115) ** 2, 0, 1))
            tex = 1 + self.tex_amp * noise2(lx * 8 + 5, ly * 8)
            return col * (shade * tex)[:, None]
        # head: skin, hair on top (everywhere from behind), eyes and mouth when facing the camera
        col = np.tile(self.skin, (n, 1))
        u = lx - p.inside
        hair = (ly > 0.115) | (((lx / 0.062) ** 2 + ((ly - 0.085) / 0.078) ** 2 > 0.7) & (ly > 0.07))
        if not p.facing:
            hair = ly > 0.035
        col[hair] = self.hair
        if p.facing:
            eyes = (np.abs(np.abs(u) - 0.022) < 0.009) & (np.abs(ly - 0.095) < 0.008)
            mouth = (np.abs(u) < 0.018) & (np.abs(ly - 0.045) < 0.005)
            col[eyes | mouth] = col[eyes | mouth] * 0.35
        shade = 0.8 + 0.25 * np.sqrt(np.clip(1 - (lx / 0.062) ** 2, 0, 1))
        return col * shade[:, None]

    def render(self, t: int) -> dict:
        H, W = self.H, self.W
        parts = self._parts(t)
        buf = {"depth": np.full((H, W), -np.inf), "label": np.zeros((H, W), np.uint8),
               "instance": np.zeros((H, W), np.uint16), "rgb": self.background.copy(),
               "src_x": self.grid_x.copy(), "src_y": self.grid_y.copy()}
        # a soft shadow on the floor under the figure
        j_x = self.cx + self.scale * float(self.tracks["x"][t])
        shadow = np.exp(-(((self.grid_x - j_x) / (0.16 * self.scale)) ** 2
                          + ((self.grid_y - self.floor) / (0.025 * self.scale)) ** 2))
        buf["rgb"] *= (1 - 0.3 * shadow)[..., None]
        prev = self.prev_parts
        for k, p in enumerate(parts):
            self._draw(buf, p, prev[k] if prev is not None else None, k)
        self.prev_parts = parts
        rng = np.random.default_rng([self.seed, t, 1])
        rgb = buf["rgb"] + rng.normal(0.0, 1.5, buf["rgb"].shape)
        flow = np.zeros((2, H, W), np.float32)
        if prev is not None:
            flow[0] = buf["src_x"] - self.grid_x
            flow[1] = buf["src_y"] - self.grid_y
        return {"label": buf["label"], "rgb": np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
                "instance": buf["instance"], "flow": flow}


def render_dance(seed: int, frames: int, size):
    """Yields the frames of one synth-dance sequence (same dict layout as render_drive)."""
    renderer = DanceRenderer(seed, frames, size)
    for t in range(frames):
        yield renderer.render(t)
