"""EVLGen-video's temporal attention (models/temporal.py) and the adapters that patch it into ViTs."""

import copy
from functools import partial

import pytest
import torch
from lavis.models.eva_vit import VisionTransformer
from torch import nn
from transformers import ViTConfig, ViTModel

from lavis_evlgen.models.patch import add_temporal
from lavis_evlgen.models.temporal import (
    TemporalAttention,
    freeze_except_temporal,
    temporal_parameters,
)
from lavis_evlgen.models.vision import HFVisionEncoder, build_vision_encoder

TEMPORAL_KEYS = ("query.weight", "query.bias", "key.weight", "key.bias", "alpha")


@pytest.fixture(scope="module")
def tiny_dinov2():
    """The builtin evlgen-tiny/vit (Dinov2Model, width 64, 2 layers) at 112 px: 65 tokens per frame."""
    return build_vision_encoder("evlgen-tiny/vit", 112, "fp32").eval()


def tiny_eva(layer_scale=False, use_checkpoint=False):
    """LAVIS's EVA VisionTransformer as create_eva_vit_g builds it, at width 32, depth 2, 28 px (5 tokens)."""
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_mean_pooling=False,
        init_values=0.1 if layer_scale else None, use_checkpoint=use_checkpoint,
    ).eval()


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=28, patch_size=14)
    return HFVisionEncoder(ViTModel(config, add_pooling_layer=False)).eval()


HOSTS = ("dinov2", "vit", "eva", "eva_layer_scale")


@pytest.fixture(params=HOSTS)
def host(request, tiny_dinov2):
    """(unpatched encoder, image size)."""
    return {
        "dinov2": lambda: (copy.deepcopy(tiny_dinov2), 112),
        "vit": lambda: (tiny_vit(), 28),
        "eva": lambda: (tiny_eva(), 28),
        "eva_layer_scale": lambda: (tiny_eva(layer_scale=True), 28),
    }[request.param]()


def frames(videos, num_frames, size, seed=0):
    """[videos * num_frames, 3, size, size], the frames of each video contiguous."""
    return torch.randn(videos * num_frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run(encoder, context, images, num_frames):
    context.num_frames = num_frames
    return encoder(images)


def reverse_frames(x, num_frames):
    """Reverse the frame order of every video of a [B*T, ...] batch."""
    return x.reshape(-1, num_frames, *x.shape[1:]).flip(1).reshape(x.shape)


def frame_mean(x, num_frames):
    return x.reshape(-1, num_frames, *x.shape[1:]).mean(1)


def randomise_temporal(encoder, seed=0, std=0.3, alpha=0.5):
    """Random query/key (and frame embeddings), alpha != 0: the modules now change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, TemporalAttention):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                module.alpha.fill_(alpha)


# ---------------------------------------------------------------- the module


def reference_temporal(module, x, num_frames):
    """The authors' TemporalTokenMerge written out per video, position and head."""
    heads, width = module.num_heads, x.shape[-1]
    hd, vd = module.query.out_features // heads, width // heads
    out = x.clone()
    for b in range(x.shape[0] // num_frames):
        for n in range(x.shape[1]):
            seq = x[b * num_frames:(b + 1) * num_frames, n]  # [T, C]
            q, k = module.query(seq), module.key(seq)
            for h in range(heads):
                scores = q[:, h * hd:(h + 1) * hd] @ k[:, h * hd:(h + 1) * hd].T / 256 ** 0.5
                mixed = scores.softmax(-1) @ seq[:, h * vd:(h + 1) * vd]
                out[b * num_frames:(b + 1) * num_frames, n, h * vd:(h + 1) * vd] += module.alpha * mixed
    return out


def test_module_matches_authors_math_and_init():
    torch.manual_seed(0)
    module = TemporalAttention(dim=16)
    assert module.query.weight.shape == (256, 16) and module.num_heads == 8 and module.scale == 256 ** -0.5
    assert module.alpha.shape == () and module.alpha.item() == 0.0
    assert module.query.weight.std().item() == pytest.approx(0.02, rel=0.1) and not module.key.bias.any()
    randomise_temporal(module, std=1.0)
    x = torch.randn(3 * 4, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x, 4), reference_temporal(module, x, 4), rtol=1e-5, atol=1e-5)
        # One frame: the softmax is 1 and the module scales its input by 1 + alpha.
        torch.testing.assert_close(module(x, 1), 1.5 * x)


# ---------------------------------------------------------------- patched ViTs


@pytest.mark.parametrize("num_frames", [1, 4, 8])
def test_identity_at_init(host, num_frames):
    encoder, size = host
    patched = copy.deepcopy(encoder)
    context = add_temporal(patched)
    assert sum(isinstance(m, TemporalAttention) for m in patched.modules()) == 2
    images = frames(2, num_frames, size)
    with torch.no_grad():
        assert torch.equal(run(patched, context, images, num_frames), encoder(images))


def test_frame_order_equivariance(host):
    encoder, size = host
    patched = copy.deepcopy(encoder)
    context = add_temporal(patched)
    randomise_temporal(patched)
    t = 4
    images = frames(2, t, size)
    with torch.no_grad():
        out = run(patched, context, images, t)
        out_reversed = run(patched, context, reverse_frames(images, t), t)
        assert (out - encoder(images)).abs().max() > 1e-2  # the modules act
    torch.testing.assert_close(out_reversed, reverse_frames(out, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frame_mean(out_reversed, t), frame_mean(out, t), rtol=1e-5, atol=1e-5)


def test_frame_position_embedding_tells_order(host):
    encoder, size = host
    patched = copy.deepcopy(encoder)
    context = add_temporal(patched, temporal_pos_embed=True, max_frames=8)
    assert all(m.frame_pos_embed.shape[0] == 8 and not m.frame_pos_embed.any()
               for m in patched.modules() if isinstance(m, TemporalAttention))
    t = 4
    images = frames(2, t, size)
    with torch.no_grad():
        assert torch.equal(run(patched, context, images, t), encoder(images))  # still identity at init
        randomise_temporal(patched)
        mean = frame_mean(run(patched, context, images, t), t)
        mean_reversed = frame_mean(run(patched, context, reverse_frames(images, t), t), t)
    assert (mean - mean_reversed).abs().max() > 1e-3


def test_gradients_reach_only_temporal_modules_through_frozen_blocks(host):
    encoder, size = host
    context = add_temporal(encoder)
    freeze_except_temporal(encoder)
    randomise_temporal(encoder)
    trainable = temporal_parameters(encoder)
    assert len(trainable) == 2 * len(TEMPORAL_KEYS)
    assert {id(p) for p in encoder.parameters() if p.requires_grad} == {id(p) for p in trainable}
    run(encoder, context, frames(2, 4, size), 4).square().mean().backward()
    for name, param in encoder.named_parameters():
        if param.requires_grad:
            # The first block's module gets its gradient through the frozen second block.
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")  # LAVIS's EVA calls checkpoint without use_reentrant
@pytest.mark.parametrize("host_name", ["dinov2", "eva"])
def test_gradients_with_reentrant_gradient_checkpointing(host_name, tiny_dinov2):
    if host_name == "dinov2":
        encoder, size = copy.deepcopy(tiny_dinov2), 112
        encoder.model.gradient_checkpointing_enable()  # transformers' default: reentrant
    else:
        encoder, size = tiny_eva(use_checkpoint=True), 28
    context = add_temporal(encoder)
    freeze_except_temporal(encoder)
    randomise_temporal(encoder)
    encoder.train()  # transformers checkpoints only in training mode
    run(encoder, context, frames(2, 4, size), 4).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in temporal_parameters(encoder))


# ---------------------------------------------------------------- the authors' checkpoints


def test_eva_state_dict_names_match_the_authors_and_load_strictly():
    encoder = tiny_eva()
    add_temporal(encoder)
    state = encoder.state_dict()
    temporal = sorted(k for k in state if ".temporal_merge." in k)
    assert temporal == sorted(f"blocks.{i}.temporal_merge.{k}" for i in range(2) for k in TEMPORAL_KEYS)
    # The authors' shapes (in_dim C, hidden 256, scalar alpha), as in their EVA checkpoints.
    g = torch.Generator().manual_seed(0)
    theirs = {f"blocks.{i}.temporal_merge.{k}": torch.randn(shape, generator=g) for i in range(2)
              for k, shape in zip(TEMPORAL_KEYS, [(256, 32), (256,), (256, 32), (256,), ()])}
    encoder.load_state_dict({**state, **theirs}, strict=True)
    loaded = encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in theirs.items())


def test_authors_checkpoint_lacks_only_the_frame_embedding():
    encoder = tiny_eva()
    add_temporal(encoder, temporal_pos_embed=True)
    state = {k: v for k, v in encoder.state_dict().items() if "frame_pos_embed" not in k}
    result = encoder.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == [f"blocks.{i}.temporal_merge.frame_pos_embed" for i in range(2)]


# ---------------------------------------------------------------- errors


def test_batch_not_divisible_by_frames_is_a_clear_error():
    encoder = tiny_eva()
    context = add_temporal(encoder)
    with pytest.raises(ValueError, match=r"batch of 6 frames .* num_frames=4"):
        run(encoder, context, frames(1, 6, 28), 4)


def test_frames_must_be_set_and_fit_the_position_embedding():
    encoder = tiny_eva()
    context = add_temporal(encoder, temporal_pos_embed=True, max_frames=4)
    with pytest.raises(RuntimeError, match="number of frames is not set"):
        encoder(frames(1, 4, 28))
    with pytest.raises(ValueError, match="8 frames per video.*max_frames=4"):
        run(encoder, context, frames(1, 8, 28), 8)


def test_patching_twice_or_an_unknown_encoder_is_an_error():
    encoder = tiny_eva()
    add_temporal(encoder)
    with pytest.raises(ValueError, match="already has temporal modules"):
        add_temporal(encoder)
    with pytest.raises(TypeError, match="no block of a supported ViT"):
        add_temporal(nn.Sequential(nn.Linear(4, 4)))


def test_half_precision_host_keeps_float32_temporal_modules():
    encoder = build_vision_encoder("evlgen-tiny/vit", 112, "fp16").eval()
    patched = copy.deepcopy(encoder)
    context = add_temporal(patched)
    assert {p.dtype for p in temporal_parameters(patched)} == {torch.float32}
    images = frames(2, 4, 112).half()
    with torch.no_grad():
        out = run(patched, context, images, 4)
        assert out.dtype == torch.float16 and torch.equal(out, encoder(images))
