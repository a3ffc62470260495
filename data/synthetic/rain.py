"""synth-rain: vertical shafts seen from the side at 32x32, a second held-out check of the CPU recipe (a world
it was not tuned on; docs/opening_the_latent.md, "The recipe on synth-rain").

The frame is a row of vertical columns, 4-6 px wide (scaled with the width), each of a random kind:

    wall    still; 1-3 lamps on it switch on and off at random (4% of the frames)
    chute   drops fall through at the column's speed (1 or 2 px per frame, drawn per sequence); a falling
            drop may freeze to ice (3% of the frames) and falls on as ice
    shaft   boxes rise through at 1 px per frame

Drops enter at the top and boxes at the bottom after a geometric gap drawn when needed. What synth-scroll and
synth-lanes lack: the motion is vertical, and some events happen in place (a lamp switching, a drop turning
to ice) rather than at the frame's edge.
"""
from __future__ import annotations

import numpy as np

from data.synthetic.scroll import Layer, _hash, band_end

CLASSES = ("wall", "chute", "shaft", "drop", "ice", "box", "lamp off", "lamp on")
PALETTE = ((120, 110, 100), (40, 40, 60), (90, 70, 50), (60, 140, 240), (200, 240, 255), (200, 150, 60),
           (70, 60, 20), (255, 230, 80))
WALL, CHUTE, SHAFT, DROP, ICE, BOX, LAMP_OFF, LAMP_ON = range(len(CLASSES))
FPS = 10
FREEZE, SWITCH = 0.03, 0.04     # per frame: a drop turns to ice; a lamp switches


class RainWorld:
    """Built lying down, as synth-lanes' horizontal lanes that move along x; render_rain transposes it, so
    `across` is the frame's width (the columns) and `along` its height (the motion)."""

    def __init__(self, seed: int, size):
        height, width = size
        self.across, self.along = across, along = width, height
        self.rng = rng = np.random.default_rng(seed)
        s_across, self.s_along = across / 32, along / 32

        def px(v):
            return max(1, round(v * self.s_along))

        self.columns, self.next_id = [], 1
        left = 0
        while left < across:
            right = band_end(rng, left, across, s_across)
            kind = int(rng.choice([WALL, CHUTE, SHAFT], p=[0.3, 0.45, 0.25]))
            column = {"kind": kind, "left": left, "right": right, "layer": None, "lamps": []}
            if kind == CHUTE:    # direction +1 along the built axis: downwards once transposed
                column["layer"] = Layer(rng, along, speed=px(int(rng.integers(1, 3))), direction=1, period=1,
                                        make=self._drop, gap_mean=px(int(rng.integers(6, 16))), gap_min=px(2))
            elif kind == SHAFT:
                column["layer"] = Layer(rng, along, speed=px(1), direction=-1, period=1, make=self._box,
                                        gap_mean=px(int(rng.integers(10, 25))), gap_min=px(3))
            else:
                for _ in range(int(rng.integers(1, 4))):
                    column["lamps"].append({"y": int(rng.integers(0, along - px(2))), "on": bool(rng.random() < 0.5),
                                            "id": self._id()})
            self.columns.append(column)
            left = right

    def _id(self) -> int:
        value = self.next_id
        self.next_id = self.next_id % 65535 + 1
        return value

    def _drop(self, rng) -> dict:
        return {"w": max(2, round(int(rng.integers(2, 4)) * self.s_along)), "kind": DROP, "id": self._id()}

    def _box(self, rng) -> dict:
        return {"w": max(3, round(int(rng.integers(3, 7)) * self.s_along)), "kind": BOX, "id": self._id()}

    def advance(self, t: int) -> None:
        for column in self.columns:
            if column["layer"] is not None:
                column["layer"].advance(t)
                for obj in column["layer"].objects:
                    if obj["kind"] == DROP and self.rng.random() < FREEZE:
                        obj["kind"] = ICE
            for lamp in column["lamps"]:
                if self.rng.random() < SWITCH:
                    lamp["on"] = not lamp["on"]


def render_rain(seed: int, frames: int, size):
    """Yields the frames of one synth-rain sequence: dicts of label (H, W) uint8, rgb (H, W, 3) uint8,
    instance (H, W) uint16 and flow (2, H, W) float32."""
    world = RainWorld(seed, size)
    across, along = world.across, world.along
    # drawn lying down: rows index the columns (across), cols the motion (along); transposed at the end
    rows, cols = np.mgrid[0:across, 0:along]
    palette = np.array(PALETTE, np.float32)
    lamp = max(1, round(2 * world.s_along))
    for t in range(frames):
        if t > 0:
            world.advance(t)
        label = np.zeros((across, along), np.uint8)
        instance = np.zeros((across, along), np.uint16)
        flow_along = np.zeros((across, along), np.float32)
        anchor = cols.copy()           # the surface's own coordinate: texture moves with the object
        for column in world.columns:
            x0, x1 = column["left"], column["right"]
            band = (rows >= x0) & (rows < x1)
            label[band] = column["kind"]
            for light in column["lamps"]:
                mask = band & (rows >= x0 + 1) & (rows < min(x1, x0 + 1 + lamp)) & (cols >= light["y"]) & (cols < light["y"] + lamp)
                label[mask], instance[mask] = LAMP_ON if light["on"] else LAMP_OFF, light["id"]
            layer = column["layer"]
            if layer is None:
                continue
            # objects leave a 1 px margin of their column on each side when the column is wide enough
            inner = band & (rows >= x0 + (x1 - x0 > 3)) & (rows < x1 - (x1 - x0 > 4))
            layer.paint(t, inner, cols, label, instance, flow_along, anchor)
        texture = _hash(anchor, rows)
        shade = np.where(label == WALL, 0.12 * (texture % 4 == 0), 0.0)                      # bricks
        shade += np.where((label == CHUTE) | (label == SHAFT), 0.15 * (texture % 5 == 0), 0)
        shade += np.where((label == BOX) & (anchor % 3 == 1), 0.3, 0)                      # slats
        rgb = np.clip(palette[label] * (1 - shade)[..., None], 0, 255).astype(np.uint8)
        flow = np.stack([np.zeros_like(flow_along.T), flow_along.T])     # (dx, dy): the motion is along y
        yield {"label": np.ascontiguousarray(label.T), "rgb": np.ascontiguousarray(rgb.transpose(1, 0, 2)),
               "instance": np.ascontiguousarray(instance.T), "flow": flow}
