"""Clips of n_past + n_future frames at a temporal stride, and a resumable sharded sampler.

A batch is a dict of tensors:
    label    uint8   (B, T, H, W)      class indices
    rgb      uint8   (B, T, 3, H, W)
    instance int32   (B, T, H, W)
    flow     float32 (B, T, 2, H, W)   backward flow between consecutive clip frames (frame 0: zeros)
Models convert dtypes on the device, so workers move the smallest tensors.
"""
from __future__ import annotations

import numpy as np
import torch

from data.layout import DatasetError, list_sequences, load_sequence_modalities, read_meta


def compose_flow(flows: np.ndarray) -> np.ndarray:
    """Chain k consecutive backward flows (k, 2, H, W), newest first, into one from the newest frame to
    the frame k steps back: f(x) = f_1(x) + f_2(x + f_1(x)) + ...  (bilinear, border clamp)."""
    total = flows[0].astype(np.float32)
    height, width = total.shape[-2:]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for step in flows[1:]:
        step = step.astype(np.float32)
        x = np.clip(xs + total[0], 0, width - 1)
        y = np.clip(ys + total[1], 0, height - 1)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
        wx, wy = x - x0, y - y0
        sampled = (step[:, y0, x0] * (1 - wx) * (1 - wy) + step[:, y0, x1] * wx * (1 - wy)
                   + step[:, y1, x0] * (1 - wx) * wy + step[:, y1, x1] * wx * wy)
        total = total + sampled
    return total


class ClipDataset(torch.utils.data.Dataset):
    """All clips of one split. Items are indices or (index, flip) pairs, as ClipSampler yields them."""

    def __init__(self, root, split: str, n_past: int, n_future: int, stride: int = 1,
                 modalities=("label",), clip_step: int = 1):
        self.root, self.split = root, split
        self.meta = read_meta(root)
        self.modalities = tuple(modalities)
        self.length = n_past + n_future
        self.stride = stride
        self.span = (self.length - 1) * stride + 1
        self.sequences, self.index = [], []
        for seq_dir in list_sequences(root, split):
            arrays = load_sequence_modalities(seq_dir, self.modalities, self.meta)
            frames = next(iter(arrays.values())).shape[0]
            if frames < self.span:
                raise DatasetError(f"{seq_dir}: {frames} frames, shorter than one clip "
                                   f"({n_past}+{n_future} frames at stride {stride} span {self.span})")
            self.sequences.append((seq_dir, arrays))
            seq_id = len(self.sequences) - 1
            self.index += [(seq_id, start) for start in range(0, frames - self.span + 1, clip_step)]
        first = self.sequences[0][1][self.modalities[0]]
        self.size = tuple(first.shape[-2:]) if self.modalities[0] == "flow" else tuple(first.shape[1:3])

    def __len__(self) -> int:
        return len(self.index)

    def clip_name(self, item: int) -> str:
        seq_id, start = self.index[item]
        return f"{self.sequences[seq_id][0].name}@{start}"

    def __getitem__(self, item):
        item, flip = item if isinstance(item, tuple) else (item, False)
        seq_id, start = self.index[item]
        arrays = self.sequences[seq_id][1]
        frames = slice(start, start + self.span, self.stride)
        out = {}
        for modality in self.modalities:
            if modality == "flow":
                clip = self._clip_flow(arrays["flow"], start)
            else:
                clip = np.array(arrays[modality][frames])
            if flip:
                clip = clip[..., ::-1].copy() if modality in ("label", "instance", "flow") else clip[:, :, ::-1].copy()
                if modality == "flow":
                    clip[:, 0] = -clip[:, 0]
            out[modality] = torch.from_numpy(self._layout(modality, clip))
        return out

    def _clip_flow(self, flow: np.ndarray, start: int) -> np.ndarray:
        height, width = flow.shape[-2:]
        clip = np.zeros((self.length, 2, height, width), np.float32)
        for i in range(1, self.length):
            t = start + i * self.stride
            # flows of frames t, t-1, ..., t-stride+1 chain back to frame t-stride
            clip[i] = compose_flow(flow[t - self.stride + 1: t + 1][::-1])
        return clip

    @staticmethod
    def _layout(modality: str, clip: np.ndarray) -> np.ndarray:
        if modality == "rgb":
            return np.ascontiguousarray(clip.transpose(0, 3, 1, 2))
        if modality == "instance":
            return clip.astype(np.int32)
        return np.ascontiguousarray(clip)


class ClipSampler(torch.utils.data.Sampler):
    """Infinite, deterministic, sharded batches that can start at any step.

    Like DistributedSampler, each rank takes a disjoint share of one global shuffled order; unlike it,
    the order is a pure function of (seed, step), so a resumed run sees exactly the batches the
    uninterrupted run would have seen. Yields lists of (index, flip) items.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, flip: bool = False, start_step: int = 0):
        if num_items == 0:
            raise DatasetError("no clips to sample from")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.flip, self.start_step = shuffle, flip, start_step

    def _epoch(self, epoch: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator) if self.shuffle else torch.arange(self.num_items)
        flips = torch.rand(self.num_items, generator=generator) < 0.5 if self.flip else torch.zeros(self.num_items, dtype=torch.bool)
        return order.tolist(), flips.tolist()

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        position = self.start_step * global_batch + self.rank * self.batch_size
        cached_epoch, order, flips = -1, None, None
        while True:
            batch = []
            for offset in range(position, position + self.batch_size):
                epoch, i = divmod(offset, self.num_items)
                if epoch != cached_epoch:
                    cached_epoch, (order, flips) = epoch, self._epoch(epoch)
                batch.append((order[i], flips[i]))
            yield batch
            position += global_batch

    def __len__(self):
        return 2**62


def make_loader(dataset: ClipDataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                world_size: int = 1, flip: bool = False, num_workers: int = 0):
    """An endless iterator of training batches, sharded over ranks, starting at `start_step`."""
    sampler = ClipSampler(len(dataset), batch_size, seed, rank, world_size, shuffle=True, flip=flip,
                          start_step=start_step)
    # A private generator: creating the iterator would otherwise draw from the global RNG and shift
    # the model's random stream between a resumed and an uninterrupted run.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                         generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def fixed_batch(dataset: ClipDataset, count: int) -> dict:
    """A fixed, evenly spread set of clips for validation and sample grids."""
    count = min(count, len(dataset))
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    items = [dataset[int(i)] for i in picks]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}
