"""A frozen-ViT feature cache: the ViT's tokens of a dataset's images, computed once, read from disk.

The ViT is frozen (method.md, section 2), so with a deterministic image processor its output for
an image never changes: computing it every epoch is wasted work. With ``run.feature_cache: True``

- every image dataset of the run gets a cache of ``[num_images, T, C_vit]`` tokens (the ViT's
  output, before ``ln_vision``, in the ViT's dtype) stored as a memory-mapped ``.npy`` under
  ``$EVLGEN_CACHE/features/<key>/`` (or ``run.feature_cache_dir``), built once, in shards over the
  run's processes;
- the dataset yields those tokens as ``samples["image"]`` ([T, C_vit] per sample) and the model's
  ``visual_encoder`` becomes a ``CachedViT`` that passes them through, checking their shape. Every
  model reading ``samples["image"]`` works unchanged: EVLGen, BLIP-2 stage 1 and stage 2.

The key hashes everything that changes the tokens: the ViT's class, config and weights, the
processor's class and transform (size, interpolation, mean, std), and each image's path, size and
modification time. A changed image, ViT or processor therefore reads another directory; a stale
cache can never be read. Random augmentation cannot be cached and is refused, as is a ViT with
trainable parts (``freeze_vit: False``, the video models' temporal modules).

The cache skips the ViT, not the file read: samples still open their image (the LAVIS dataset's
``__getitem__`` does), so a run stays a drop-in replacement of the uncached one.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lavis_evlgen.common.paths import cache_root

FORMAT_VERSION = 1
BUILD_BATCH = 32


class CachedViT(nn.Module):
    """Stands in for a frozen ViT whose tokens come from the feature cache.

    forward(tokens [B, T, C]) -> the same tensor; anything else (pixels) is an error, so a model
    swapped to read the cache can never silently treat images as tokens.
    """

    def __init__(self, num_tokens: int, num_features: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.num_features = num_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.num_features):
            raise ValueError(
                f"this model reads cached ViT tokens [B, {self.num_tokens}, {self.num_features}] "
                f"(run.feature_cache), got a tensor of shape {list(tokens.shape)}; feed images to a model "
                f"built without the feature cache"
            )
        return tokens

    def extra_repr(self) -> str:
        return f"tokens=[{self.num_tokens}, {self.num_features}] (from the feature cache)"


def random_transforms(processor) -> list[str]:
    """Names of the random steps of a LAVIS image processor's ``transform`` (empty when deterministic)."""
    transform = getattr(processor, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    return [type(step).__name__ for step in steps if "Random" in type(step).__name__]


def weights_digest(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_list(dataset) -> list[str]:
    """The distinct images of a LAVIS image dataset (``ann["image"]``), in annotation order."""
    missing = [i for i, ann in enumerate(dataset.annotation) if "image" not in ann]
    if missing:
        raise KeyError(f"{type(dataset).__name__}: annotation entries {missing[:5]} have no 'image' key; "
                       f"run.feature_cache caches image datasets only")
    return list(dict.fromkeys(ann["image"] for ann in dataset.annotation))


def images_digest(vis_root: str, images: list[str]) -> str:
    """A hash of each image's path, size and modification time: any edit gives another key."""
    digest = hashlib.blake2b(digest_size=16)
    for image in images:
        stat = os.stat(os.path.join(vis_root, image))
        digest.update(f"{image}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_meta(vit_identity: dict, processor, vis_root: str, images: list[str]) -> dict:
    """Everything the cached tokens depend on; its hash names the cache directory."""
    return {
        "format": FORMAT_VERSION,
        "vit": vit_identity,
        "processor": f"{type(processor).__name__}: {getattr(processor, 'transform', processor)!r}",
        "vis_root": str(Path(vis_root).resolve()),
        "num_images": len(images),
        "images": images_digest(vis_root, images),
    }


def meta_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


class _Pixels(Dataset):
    """(row, processed image) for the rows a process computes."""

    def __init__(self, vis_root: str, images: list[str], rows: list[int], processor):
        self.vis_root, self.images, self.rows, self.processor = vis_root, images, rows, processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        path = os.path.join(self.vis_root, self.images[row])
        with Image.open(path) as image:
            return row, self.processor(image.convert("RGB"))


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value):
    if _dist()[1] > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _barrier() -> None:
    if _dist()[1] > 1:
        dist.barrier()


def compute_tokens(vit: nn.Module, pixels: Dataset, out: np.ndarray, device: torch.device, desc: str) -> None:
    """Runs the frozen ViT over ``pixels`` (rows, images [3, H, W]) into ``out[rows]`` ([T, C] each)."""
    dtype = next(vit.parameters()).dtype
    loader = DataLoader(pixels, batch_size=BUILD_BATCH, shuffle=False, num_workers=0)
    with torch.no_grad(), tqdm(total=len(pixels), desc=desc, unit="img", disable=_dist()[0] != 0) as bar:
        for rows, images in loader:
            tokens = vit(images.to(device=device, dtype=dtype))
            out[rows.numpy()] = tokens.cpu().numpy()
            bar.update(len(rows))


def ensure_cache(root: Path, meta: dict, images: list[str], vit: nn.Module, processor, vis_root: str,
                 device: torch.device, desc: str) -> Path:
    """The complete cache directory for ``meta`` under ``root``, built now if missing.

    Built in a temporary sibling (every process computes rows ``rank::world_size`` into one shared
    memory map) and renamed into place when complete, so an interrupted build is never read and two
    runs building the same cache at once both end with one good copy.
    """
    final = root / meta_key(meta)
    if _broadcast((final / "meta.json").is_file()):  # rank 0 decides: every process takes the same path
        return final
    rank, world = _dist()
    tmp = None
    if rank == 0:
        _, first = _Pixels(vis_root, images, [0], processor)[0]
        with torch.no_grad():
            probe = vit(first[None].to(device=device, dtype=next(vit.parameters()).dtype))
        dtype = _numpy_dtype(probe.dtype)  # before anything is written: a refusal leaves nothing behind
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype,
                                  shape=(len(images), *probe.shape[1:])).flush()
    tmp = Path(_broadcast(str(tmp)))
    try:
        tokens = np.load(tmp / "tokens.npy", mmap_mode="r+")
        compute_tokens(vit, _Pixels(vis_root, images, list(range(rank, len(images), world)), processor), tokens,
                       device, desc)
        tokens.flush()
        del tokens
        _barrier()
        if rank == 0:
            (tmp / "images.json").write_text(json.dumps(images))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))  # last: marks it complete
            try:
                os.replace(tmp, final)
            except OSError:  # another run finished the same cache first
                if not (final / "meta.json").is_file():
                    raise
        _barrier()
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        raise ValueError("run.feature_cache: a bf16 ViT cannot be stored in a .npy; use vit_precision fp16 or fp32")
    return torch.empty((), dtype=dtype).numpy().dtype


class CachedFeatureDataset(Dataset):
    """A LAVIS image dataset whose samples carry the cached ViT tokens [T, C] as ``"image"``.

    Everything else (annotation, collater, ground truth, scene scores) is the wrapped dataset's.
    """

    def __init__(self, dataset, cache_dir: Path):
        self.dataset = dataset
        self.cache_dir = cache_dir
        images = json.loads((cache_dir / "images.json").read_text())
        self.row_of = {image: row for row, image in enumerate(images)}
        self.tokens = np.load(cache_dir / "tokens.npy", mmap_mode="r")

    def __getattr__(self, name):
        if name in ("dataset", "__setstate__"):  # not yet set (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        sample["image"] = torch.from_numpy(np.array(self.tokens[self.row_of[self.dataset.annotation[index]["image"]]]))
        return sample


def vit_identity(model: nn.Module) -> dict:
    """What defines a model's ViT tokens: its vision config keys, class and weights."""
    config = getattr(model, "config", None)
    keys = ("vit_model", "image_size", "vit_precision", "vit_layer", "drop_path_rate")
    return {
        "class": type(model.visual_encoder).__qualname__,
        "config": {key: getattr(config, key, None) for key in keys},
        "weights": weights_digest(model.visual_encoder),
    }


def attach_feature_cache(model: nn.Module, datasets: dict, cache_dir: str | None = None) -> dict:
    """Builds (or finds) the cache of every dataset split and switches the run to it.

    Args:
        model: a LAVIS model with a frozen ``visual_encoder`` mapping [B, 3, H, W] -> [B, T, C].
        datasets: ``{dataset name: {split: dataset}}`` as ``task.build_datasets`` returns.
        cache_dir: ``run.feature_cache_dir``; null for ``$EVLGEN_CACHE/features``.
    Returns:
        the same mapping with every dataset wrapped in ``CachedFeatureDataset``; ``model.visual_encoder``
        is replaced by a ``CachedViT`` (the ViT's weights are freed).
    """
    vit = model.visual_encoder
    if isinstance(vit, CachedViT):
        raise ValueError("run.feature_cache: the model already reads cached tokens")
    trainable = [name for name, p in vit.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"run.feature_cache: the ViT has trainable parameters ({trainable[:3]}...), so its "
                         f"tokens change during training and cannot be cached (freeze_vit: False, or the video "
                         f"models' temporal modules)")
    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "features"
    identity = vit_identity(model)
    device = next(vit.parameters()).device
    was_training = vit.training
    vit.eval()
    wrapped, shape = {}, None
    for name, splits in datasets.items():
        wrapped[name] = {}
        for split, dataset in splits.items():
            randomness = random_transforms(dataset.vis_processor)
            if randomness:
                raise ValueError(
                    f"run.feature_cache: the {name}/{split} image processor {type(dataset.vis_processor).__name__} "
                    f"draws {randomness} at random; cached tokens would freeze one draw. Use a deterministic "
                    f"processor (e.g. blip_image_eval) for that split or turn the cache off"
                )
            images = image_list(dataset)
            meta = cache_meta(identity, dataset.vis_processor, dataset.vis_root, images)
            path = ensure_cache(root, meta, images, vit, dataset.vis_processor, dataset.vis_root, device,
                                desc=f"ViT features {name}/{split}")
            logging.info("feature cache %s/%s: %d images, %s", name, split, len(images), path)
            wrapped[name][split] = CachedFeatureDataset(dataset, path)
            shape = wrapped[name][split].tokens.shape[1:]
    vit.train(was_training)
    if shape is not None:
        model.visual_encoder = CachedViT(*shape)
    return wrapped
