"""HVP data: the common on-disk layout (layout.py), clips and sampling (clips.py), synthetic
generators (synthetic/), real-dataset preparation (prepare.py), rollout outputs (rollout_io.py)."""
from data.layout import DatasetError, list_sequences, load_sequence, load_sequence_modalities, read_meta

__all__ = ["ensure_dataset", "DatasetError", "list_sequences", "load_sequence", "load_sequence_modalities", "read_meta"]


def ensure_dataset(cfg) -> dict:
    """The dataset's meta, generating synthetic data first when `data.root` is missing and
    `data.synth` names a generator. Checks the meta against the config's classes and frame size."""
    from pathlib import Path
    root = Path(cfg.data.root)
    if not (root / "meta.yaml").is_file():
        if cfg.data.synth == "none":
            raise DatasetError(f"{root}: no dataset there (data.synth=none; prepare it with python -m data.prepare)")
        from data.synthetic import write_dataset
        height, width = cfg.data.size
        try:
            write_dataset(cfg.data.synth, root, sequences=cfg.data.synth_sequences, frames=cfg.data.synth_frames,
                          size=(height, width), seed=cfg.data.synth_seed, val=cfg.data.synth_val,
                          test=cfg.data.synth_test, workers=cfg.data.synth_workers)
        except ValueError as e:  # a folder that is not HVP's, or one generated with other arguments
            raise DatasetError(f"data.root={root}: {e}") from None
    meta = read_meta(root)
    if meta["num_classes"] != cfg.data.num_classes:
        raise DatasetError(f"{root / 'meta.yaml'}: num_classes is {meta['num_classes']} but the config's "
                           f"data.num_classes is {cfg.data.num_classes}")
    if "size" in meta and list(meta["size"]) != list(cfg.data.size):
        raise DatasetError(f"{root / 'meta.yaml'}: the frames are {list(meta['size'])} (H, W) but the config's "
                           f"data.size is {list(cfg.data.size)}")
    return meta
