"""Merge map: tracked sources partition the patches; the command writes a PNG."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig

from lavis_evlgen.merge_map import main, patch_owners
from lavis_evlgen.models.tomeformer import TomeFormer


def test_every_patch_is_held_by_exactly_one_output_token():
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    tomeformer = TomeFormer.from_bert_config(config, tome_r=[12, 12, 10], trace_source=True).eval()
    with torch.no_grad():
        source = tomeformer(torch.randn(1, 1 + 8 * 8, 32)).source[0]
    owners = patch_owners(source, (8, 8))
    assert owners.shape == (8, 8)
    assert source.shape[0] == tomeformer.output_token_count(65) == 31
    # Each patch's owner really holds it, and the owners' patch counts add up to the grid.
    assert bool((source[owners.flatten(), torch.arange(1, 65)] == 1).all())
    sizes = torch.bincount(owners.flatten(), minlength=source.shape[0])
    assert sizes[0] == 0 and int(sizes.sum()) == 64  # token 0 is the CLS token, which holds no patch
    assert sorted(sizes.tolist()) == sorted((source[:, 1:].sum(1)).long().tolist())


def test_a_source_that_does_not_partition_is_refused():
    source = torch.eye(5)
    source[2, 3] = 1  # patch 3 now held by two tokens
    with pytest.raises(ValueError, match="held by"):
        patch_owners(source, (2, 2))
    with pytest.raises(ValueError, match="grid 3x3"):
        patch_owners(torch.eye(5), (3, 3))


def test_command_writes_a_png_that_repeats(tmp_path):
    """The untrained connector's random vit_proj is seeded, so the same command draws the same map."""
    pictures = []
    for name in ("a.png", "b.png"):
        main(["--image", "skimage:chelsea", "--r", "16", "16", "--model-type", "tiny", "--out", str(tmp_path / name)])
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and png.width > 100
            pictures.append(np.asarray(png.convert("RGB")))
    assert np.array_equal(*pictures)
