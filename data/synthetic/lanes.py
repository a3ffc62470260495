"""synth-lanes: a top-down crossing of lanes at 32x32, the held-out check of the CPU recipe (a world it was not
tuned on; docs/opening_the_latent.md, "The recipe on lanes worlds").

The frame is a stack of horizontal lanes, 4-6 px high (scaled with the height), each of a random kind:

    grass   still
    road    cars (short) and trucks (long) drive through at the lane's speed
    water   logs float through at the lane's speed; lily pads sit still on the water

Every road and water lane has its own direction, speed (1 or 2 px per frame at 32 px width) and traffic
density, drawn per sequence, so the motion is learnable only from the frames (the speeds vary by sequence,
unlike synth-scroll's fixed layers). Vehicles and logs enter at the lane's upstream edge after a geometric
gap drawn when needed: when, which kind and how long are events only a latent can decide. The camera does
not move, so nothing else is ever born and a model that drops those events empties its lanes.
"""
from __future__ import annotations

import numpy as np

from data.synthetic.scroll import Layer, _hash, band_end

CLASSES = ("grass", "road", "water", "car", "truck", "log", "lily pad")
PALETTE = ((90, 170, 70), (70, 70, 80), (50, 110, 200), (220, 50, 50), (240, 170, 40), (130, 80, 40),
           (40, 210, 120))
GRASS, ROAD, WATER, CAR, TRUCK, LOG, LILY = range(len(CLASSES))
FPS = 10


class LanesWorld:
    def __init__(self, seed: int, size):
        self.height, self.width = height, width = size
        self.rng = rng = np.random.default_rng(seed)
        sx, sy = width / 32, height / 32
        self.sx = sx

        def px(v):
            return max(1, round(v * sx))

        self.lanes = []           # dicts: kind, top, bottom, layer (None for grass), lily pads (water)
        self.next_id = 1
        top = 0
        while top < height:
            bottom = band_end(rng, top, height, sy)
            kind = int(rng.choice([GRASS, ROAD, WATER], p=[0.25, 0.45, 0.30]))
            lane = {"kind": kind, "top": top, "bottom": bottom, "layer": None, "lilies": []}
            if kind != GRASS:
                make = self._vehicle if kind == ROAD else self._log
                gap_mean = px(int(rng.integers(8, 25)))
                lane["layer"] = Layer(rng, width, speed=px(int(rng.integers(1, 3))), direction=int(rng.choice([-1, 1])),
                                      period=1, make=make, gap_mean=gap_mean, gap_min=px(3))
            if kind == WATER:
                for _ in range(int(rng.integers(0, 3))):
                    lane["lilies"].append((int(rng.integers(0, width - px(2) + 1)), self._id()))
            self.lanes.append(lane)
            top = bottom

    def _id(self) -> int:
        value = self.next_id
        self.next_id = self.next_id % 65535 + 1
        return value

    def _vehicle(self, rng) -> dict:
        if rng.random() < 0.7:
            return {"w": max(2, round(int(rng.integers(3, 6)) * self.sx)), "kind": CAR, "id": self._id()}
        return {"w": max(4, round(int(rng.integers(7, 12)) * self.sx)), "kind": TRUCK, "id": self._id()}

    def _log(self, rng) -> dict:
        return {"w": max(3, round(int(rng.integers(5, 13)) * self.sx)), "kind": LOG, "id": self._id()}

    def advance(self, t: int) -> None:
        for lane in self.lanes:
            if lane["layer"] is not None:
                lane["layer"].advance(t)


def render_lanes(seed: int, frames: int, size):
    """Yields the frames of one synth-lanes sequence: dicts of label (H, W) uint8, rgb (H, W, 3) uint8,
    instance (H, W) uint16 and flow (2, H, W) float32."""
    height, width = size
    world = LanesWorld(seed, size)
    rows, cols = np.mgrid[0:height, 0:width]
    palette = np.array(PALETTE, np.float32)
    lily = max(1, round(2 * world.sx))
    for t in range(frames):
        if t > 0:
            world.advance(t)
        label = np.zeros((height, width), np.uint8)
        instance = np.zeros((height, width), np.uint16)
        flow_x = np.zeros((height, width), np.float32)
        anchor = cols.copy()           # the surface's own column: texture moves with the object
        for lane in world.lanes:
            y0, y1 = lane["top"], lane["bottom"]
            band = (rows >= y0) & (rows < y1)
            label[band] = lane["kind"]
            for x, ident in lane["lilies"]:
                pad = band & (rows >= y0 + 1) & (rows < min(y1, y0 + 1 + lily)) & (cols >= x) & (cols < x + lily)
                label[pad], instance[pad] = LILY, ident
            layer = lane["layer"]
            if layer is None:
                continue
            # objects leave a 1 px margin of their lane above and below when the lane is tall enough
            inner = band & (rows >= y0 + (y1 - y0 > 3)) & (rows < y1 - (y1 - y0 > 4))
            layer.paint(t, inner, cols, label, instance, flow_x, anchor)
        texture = _hash(anchor, rows)
        shade = np.where(label == GRASS, 0.12 * (texture % 4 == 0), 0.0)
        shade += np.where(label == WATER, 0.15 * (texture % 5 == 0), 0)
        shade += np.where((label == LOG) & (anchor % 4 == 0), 0.3, 0)                     # bark rings
        shade += np.where(((label == CAR) | (label == TRUCK)) & (anchor % 5 == 1), 0.35, 0)  # windows
        rgb = palette[label] * (1 - np.clip(shade, -1.5, 0.6))[..., None]
        flow = np.stack([flow_x, np.zeros_like(flow_x)])
        yield {"label": label, "rgb": np.clip(rgb, 0, 255).astype(np.uint8), "instance": instance, "flow": flow}
