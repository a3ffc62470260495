"""synth-scroll: a side-scrolling landscape, the CPU-scale world for the question "does the latent decide
what the past cannot?" (docs/design.md, "The CPU-scale world").

Everything moves by whole pixels per frame, so the deterministic part is exactly learnable, and every
layer has its own speed or direction:

    clouds      drift right, 1 px every 2nd frame          born at the left edge
    hills       scroll left 1 px per frame; the skyline is a random walk, new columns enter at the right
    ground      grass, road, houses, trees, poles scroll left 2 px per frame; objects born at the right edge
    far lane    cars drive right, 1 px per frame           born at the left edge
    near lane   cars drive left, 3 px per frame            born at the right edge

(speeds at 32 px width; they scale with the width). The gap before the next object of a layer is a
geometric draw made when it is needed and never visible beforehand, so when an object enters, which kind,
and its size are events that no amount of past frames determines: only a latent can decide them. The
stream never repeats. The RGB frame is each class's colour with a texture fixed to the surface (windows,
leaves, stripes, lane dashes), so motion is visible in RGB too; flow is exact (every pixel moves with
its layer; a pixel whose layer entered this frame points outside the image).
"""
from __future__ import annotations

import numpy as np

CLASSES = ("sky", "cloud", "hill", "grass", "road", "house", "tree", "pole", "car")
PALETTE = ((110, 170, 235), (235, 235, 240), (95, 130, 75), (120, 190, 70), (90, 90, 95), (200, 120, 80),
           (30, 110, 40), (230, 200, 40), (210, 40, 40))
SKY, CLOUD, HILL, GRASS, ROAD, HOUSE, TREE, POLE, CAR = range(len(CLASSES))
FPS = 10


def band_end(rng, start: int, extent: int, scale: float) -> int:
    """Where a lane (or a synth-rain column) that begins at `start` ends: 4-6 px wide at 32 px (times `scale`),
    stretched to `extent` when less than 3 px would be left beyond it (no sliver)."""
    end = min(extent, start + max(3, round(int(rng.integers(4, 7)) * scale)))
    return extent if extent - end < max(3, round(3 * scale)) else end


class Layer:
    """Objects on one horizontal band that all move `speed` px per moving frame in `direction` (-1 left,
    +1 right), every `period`-th frame. New objects enter at the upstream edge after a geometric gap."""

    def __init__(self, rng, width, *, speed, direction, period, make, gap_mean, gap_min):
        self.rng, self.width = rng, width
        self.speed, self.direction, self.period = speed, direction, period
        self.make, self.gap_mean, self.gap_min = make, gap_mean, gap_min
        self.objects = []        # dicts with "x" (leftmost column, screen coordinates) and "w"
        # the free space before the next object, measured from the upstream edge of the last one
        self.next_at = self._gap() - width if direction < 0 else width - self._gap()
        self.fill()

    def _gap(self) -> int:
        return self.gap_min + int(self.rng.geometric(1.0 / self.gap_mean)) - 1

    def shift(self, t: int) -> int:
        """Pixels moved at frame t (signed)."""
        return self.direction * self.speed if t % self.period == 0 else 0

    def advance(self, t: int) -> None:
        d = self.shift(t)
        for obj in self.objects:
            obj["x"] += d
        self.next_at += d
        self.objects = [o for o in self.objects if o["x"] + o["w"] > 0 and o["x"] < self.width]
        self.fill()

    def paint(self, t: int, inside, cols, label, instance, flow_x, anchor) -> None:
        """Draws the objects at frame t into the pixels `inside` (one band; an object covers its columns there):
        class, instance id, flow along x and the texture anchor, written into those arrays."""
        flow = -self.shift(t) * (t > 0)
        for obj in self.objects:
            mask = inside & (cols >= obj["x"]) & (cols < obj["x"] + obj["w"])
            label[mask], instance[mask] = obj["kind"], obj["id"]
            flow_x[mask] = flow
            anchor[mask] = (cols - obj["x"])[mask]

    def fill(self) -> None:
        """Spawn every object whose position has scrolled into (or is about to scroll into) the frame."""
        while True:
            if self.direction < 0 and self.next_at < self.width:
                obj = self.make(self.rng)
                obj["x"] = self.next_at
                self.next_at = obj["x"] + obj["w"] + self._gap()
            elif self.direction > 0 and self.next_at > 0:
                obj = self.make(self.rng)
                obj["x"] = self.next_at - obj["w"]
                self.next_at = obj["x"] - self._gap()
            else:
                return
            self.objects.append(obj)


class ScrollWorld:
    def __init__(self, seed: int, size):
        self.height, self.width = height, width = size
        self.rng = rng = np.random.default_rng(seed)
        sx, sy = width / 32, height / 32
        self.sx, self.sy = sx, sy
        self.ground = round(0.60 * height)            # where the hills end and the grass begins
        self.base = round(0.70 * height)              # where houses, trees and poles stand
        self.road = round(0.75 * height)
        self.far_lane = (self.road + max(1, round(0.5 * sy)), round(0.87 * height))
        self.near_lane = (round(0.87 * height), height)
        self.next_id = 1

        def px(v):  # a length of the 32x32 world at this size
            return max(1, round(v * sx))

        self.hill_speed, self.ground_speed = px(1), px(2)
        self.layers = {
            "cloud": Layer(rng, width, speed=px(1), direction=1, period=2, make=self._cloud,
                           gap_mean=px(14), gap_min=px(4)),
            "ground": Layer(rng, width, speed=self.ground_speed, direction=-1, period=1, make=self._ground_object,
                            gap_mean=px(9), gap_min=px(2)),
            "far": Layer(rng, width, speed=px(1), direction=1, period=1, make=self._car,
                         gap_mean=px(22), gap_min=px(6)),
            "near": Layer(rng, width, speed=px(3), direction=-1, period=1, make=self._car,
                          gap_mean=px(30), gap_min=px(8)),
        }
        # hill skyline per world column: column x of the screen at frame t is world column x + hill_offset
        self.hill_offset = 0
        self.skyline = [round(0.47 * height)]
        self._extend_skyline(width)
        self.ground_offset = 0                        # world column of screen column 0 for the ground layer

    def _id(self) -> int:
        value = self.next_id
        self.next_id = self.next_id % 65535 + 1
        return value

    def _cloud(self, rng) -> dict:
        w = max(3, round(rng.integers(6, 12) * self.sx))
        h = max(2, round(rng.integers(3, 6) * self.sy))
        top = round(rng.integers(1, 8) * self.sy)
        return {"w": w, "kind": CLOUD, "top": top, "h": h, "id": self._id()}

    def _ground_object(self, rng) -> dict:
        kind = rng.choice([HOUSE, TREE, POLE], p=[0.4, 0.45, 0.15])
        if kind == HOUSE:
            w, h = max(3, round(rng.integers(5, 10) * self.sx)), max(3, round(rng.integers(5, 11) * self.sy))
        elif kind == TREE:
            w, h = max(3, round(rng.integers(3, 7) * self.sx)), max(3, round(rng.integers(6, 12) * self.sy))
        else:
            w, h = max(1, round(self.sx)), max(4, round(rng.integers(9, 13) * self.sy))
        return {"w": w, "kind": int(kind), "h": h, "id": self._id()}

    def _car(self, rng) -> dict:
        return {"w": max(3, round(rng.integers(5, 9) * self.sx)), "kind": CAR, "id": self._id()}

    def _extend_skyline(self, columns: int) -> None:
        low, high = round(0.38 * self.height), self.ground - max(1, round(2 * self.sy))
        for _ in range(columns):
            step = int(self.rng.choice([-1, 0, 0, 1]))
            self.skyline.append(int(np.clip(self.skyline[-1] + step, low, high)))

    def advance(self, t: int) -> None:
        for layer in self.layers.values():
            layer.advance(t)
        self.hill_offset += self.hill_speed
        self._extend_skyline(self.hill_speed)
        self.ground_offset += self.ground_speed


def _hash(u, v):
    """A fixed pseudo-random integer per (column, row) of a surface: the texture moves with it."""
    return ((u.astype(np.int64) * 73856093) ^ (v.astype(np.int64) * 19349663)) & 0xFFFF


def render_scroll(seed: int, frames: int, size):
    """Yields the frames of one synth-scroll sequence: dicts of label (H, W) uint8, rgb (H, W, 3) uint8,
    instance (H, W) uint16 and flow (2, H, W) float32."""
    height, width = size
    world = ScrollWorld(seed, size)
    rows, cols = np.mgrid[0:height, 0:width]
    palette = np.array(PALETTE, np.float32)
    for t in range(frames):
        if t > 0:
            world.advance(t)
        label = np.full((height, width), SKY, np.uint8)
        instance = np.zeros((height, width), np.uint16)
        flow_x = np.zeros((height, width), np.float32)
        anchor = cols.copy()          # the surface's own column coordinate: texture moves with the surface
        shade = np.zeros((height, width), np.float32)

        def paint(mask, cls, ident, dx, u):
            label[mask], instance[mask], flow_x[mask], anchor[mask] = cls, ident, dx, u[mask]

        moving = t > 0
        cloud_layer = world.layers["cloud"]
        for obj in cloud_layer.objects:
            cy, cx = obj["top"] + obj["h"] / 2, obj["x"] + obj["w"] / 2
            mask = ((rows + 0.5 - cy) / (obj["h"] / 2)) ** 2 + ((cols + 0.5 - cx) / (obj["w"] / 2)) ** 2 <= 1
            paint(mask, CLOUD, obj["id"], -cloud_layer.shift(t) * moving, cols - obj["x"])
        skyline = np.array(world.skyline[world.hill_offset:world.hill_offset + width])
        paint(rows >= skyline[None, :], HILL, 0, world.hill_speed * moving, cols + world.hill_offset)
        ground_u = cols + world.ground_offset
        paint(rows >= world.ground, GRASS, 0, world.ground_speed * moving, ground_u)
        paint(rows >= world.road, ROAD, 0, world.ground_speed * moving, ground_u)
        ground = world.layers["ground"]
        for obj in ground.objects:
            inside = (cols >= obj["x"]) & (cols < obj["x"] + obj["w"])
            top = world.base - obj["h"]
            if obj["kind"] == TREE:
                trunk_x = obj["x"] + obj["w"] // 2
                crown_r = obj["w"] / 2
                crown_y = top + crown_r
                crown = ((rows + 0.5 - crown_y) ** 2 + (cols + 0.5 - (obj["x"] + obj["w"] / 2)) ** 2) <= crown_r ** 2
                trunk = (cols == trunk_x) & (rows >= crown_y) & (rows < world.base)
                mask = inside & (crown | trunk)
            else:
                mask = inside & (rows >= top) & (rows < world.base)
            paint(mask, obj["kind"], obj["id"], -ground.shift(t) * moving, cols - obj["x"])
        for name, (y0, y1) in (("far", world.far_lane), ("near", world.near_lane)):
            lane = world.layers[name]
            for obj in lane.objects:
                # body over the lane's lower two thirds, a cabin over the middle half above it
                body = (rows >= y0 + (y1 - y0) // 3) & (rows < y1) & (cols >= obj["x"]) & (cols < obj["x"] + obj["w"])
                quarter = obj["w"] // 4
                cabin = ((rows >= y0) & (rows < y0 + (y1 - y0) // 3) & (cols >= obj["x"] + quarter)
                         & (cols < obj["x"] + obj["w"] - quarter))
                paint(body | cabin, CAR, obj["id"], -lane.shift(t) * moving, cols - obj["x"])

        # textures fixed to each surface: anchor is the surface's own column, rows do not move
        texture = _hash(anchor, rows)
        shade += np.where(label == HOUSE, 0.35 * ((anchor % 3 == 1) & (rows % 3 == 1)), 0)       # windows
        shade += np.where(label == TREE, 0.25 * (texture % 3 == 0), 0)                          # leaves
        shade += np.where((label == GRASS) | (label == HILL), 0.12 * (texture % 4 == 0), 0)      # tufts
        shade -= np.where((label == ROAD) & (rows == (world.far_lane[1] + world.near_lane[0]) // 2)
                          & (anchor % 6 < 3), 1.2, 0)                                           # lane dashes
        shade += np.where(label == CAR, 0.3 * (rows < world.far_lane[0] + 1), 0)
        rgb = palette[label] * (1 - np.clip(shade, -1.5, 0.6))[..., None]
        flow = np.stack([flow_x, np.zeros_like(flow_x)])
        yield {"label": label, "rgb": np.clip(rgb, 0, 255).astype(np.uint8), "instance": instance, "flow": flow}
