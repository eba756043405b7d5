"""EVLGen's connector options (``connector: tomeformer | avgpool | mlp``) at tiny size, the pooling
math, and the per-layer r schedules that end at a given token count."""
import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf

from lavis_evlgen.models import EVLGenConfig, EVLGenVicuna
from lavis_evlgen.models.merge import capped_merges, merged_token_counts, schedule_to_count
from lavis_evlgen.models.token_pool import avg_pool_tokens, pool_grid, pooled_shape

VISION_TOKENS = 65  # the tiny ViT at 112 px: CLS + 8 x 8 patches
SOFT_PROMPTS = {"tomeformer": 33, "avgpool": 33, "mlp": 65}  # tiny: 2 layers of r=16 -> 65 -> 49 -> 33


def tiny(connector: str, **overrides):
    cfg = OmegaConf.load(EVLGenVicuna.default_config_path("tiny")).model
    torch.manual_seed(0)
    return EVLGenVicuna.from_config(OmegaConf.merge(cfg, {"connector": connector, **overrides}))


@pytest.fixture(scope="module")
def models():
    return {name: tiny(name) for name in SOFT_PROMPTS}


def batch(size=2):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(size, 3, 112, 112, generator=g),
            "text_input": ["a red circle on the left", "two blue squares"][:size]}


# ---------------------------------------------------------------- pooling and schedules
@pytest.mark.parametrize("grid, pooled, shape", [(8, 28, (4, 7)), (8, 32, (4, 8)), (8, 16, (4, 4)),
                                                 (8, 64, (8, 8)), (16, 28, (4, 7)), (8, 1, (1, 1))])
def test_pool_grid_is_the_squarest_fitting_factor_pair(grid, pooled, shape):
    assert pool_grid(grid, pooled) == shape


def test_pool_grid_refuses_counts_that_do_not_tile_the_grid():
    with pytest.raises(ValueError, match="31 pooled patches do not tile a 8 x 8"):
        pool_grid(8, 31)
    with pytest.raises(ValueError, match="63 patch tokens"):
        pooled_shape(64, 17)


def test_avg_pool_tokens_keeps_cls_and_averages_patch_blocks():
    tokens = torch.randn(2, VISION_TOKENS, 5)
    pooled = avg_pool_tokens(tokens, 17)  # 8 x 8 patches -> 4 x 4 cells of 2 x 2 patches
    assert pooled.shape == (2, 17, 5)
    torch.testing.assert_close(pooled[:, 0], tokens[:, 0])
    patch_map = tokens[:, 1:].reshape(2, 8, 8, 5)
    # Cell (row 1, column 2) of the 4 x 4 map: patch rows 2-3, patch columns 4-5.
    torch.testing.assert_close(pooled[:, 1 + 1 * 4 + 2], patch_map[:, 2:4, 4:6].mean((1, 2)))


@pytest.mark.parametrize("num_tokens, layers, target, expected", [
    (65, 2, 29, [18, 18]), (65, 3, 29, [12, 12, 12]), (65, 6, 29, [6] * 6), (65, 2, 65, [0, 0]),
    (65, 2, 17, [32, 16]), (257, 12, 29, [19] * 12), (257, 6, 29, [38, 38, 38, 38, 48, 28]),
])
def test_schedule_to_count_ends_at_the_target_within_tomes_cap(num_tokens, layers, target, expected):
    schedule = schedule_to_count(num_tokens, layers, target)
    assert schedule == expected
    assert merged_token_counts(num_tokens, schedule)[-1] == target
    assert capped_merges(num_tokens, schedule) == []


def test_schedule_to_count_refuses_unreachable_targets():
    # One layer merges at most (65 - 1) // 2 = 32 tokens: 33 is the floor.
    with pytest.raises(ValueError, match="65 tokens cannot reach 29 in 1 layer"):
        schedule_to_count(65, 1, 29)
    with pytest.raises(ValueError, match="target=70"):
        schedule_to_count(65, 2, 70)


# ---------------------------------------------------------------- the three options
@pytest.mark.parametrize("connector", SOFT_PROMPTS)
def test_soft_prompts_per_option(models, connector):
    model = models[connector]
    prefix = model.encode_image(batch()["image"])
    assert prefix.shape == (2, SOFT_PROMPTS[connector], model.llm.config.hidden_size)
    assert model.soft_prompt_count(VISION_TOKENS) == SOFT_PROMPTS[connector]


@pytest.mark.parametrize("connector", SOFT_PROMPTS)
def test_gradients_reach_every_trainable_tensor(models, connector):
    model = models[connector]
    model.train()
    model.zero_grad()
    model(batch())["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == (
        {"ln_vision", "vit_proj", "llm_proj"} | ({"connector"} if connector != "mlp" else set()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.llm.parameters())


def test_avgpool_runs_the_same_bert_layers_without_merging(models):
    tome, pool = models["tomeformer"], models["avgpool"]
    assert pool.connector.r_schedule == [0, 0] and tome.connector.r_schedule == [16, 16]
    assert pool.merge_schedule == tome.merge_schedule == [16, 16]
    # Same module names and shapes: a TomeFormer checkpoint loads into the avgpool model as it is.
    tome_state = tome.state_dict()
    assert {k: v.shape for k, v in pool.state_dict().items()} == {k: v.shape for k, v in tome_state.items()}
    pool.load_state_dict(tome_state)
    with torch.no_grad():
        image = batch()["image"]
        assert not torch.allclose(pool.encode_image(image), tome.encode_image(image))


def test_mlp_is_linear_gelu_linear_on_every_token(models):
    model = models["mlp"]
    assert isinstance(model.connector, torch.nn.GELU)
    # Its hidden width is the BERT connector's, so vit_proj and llm_proj keep their shapes.
    width = models["tomeformer"].connector.hidden_size
    assert model.vit_proj.out_features == model.llm_proj.in_features == width
    with torch.no_grad():
        tokens = model.ln_vision(model.vision_tokens(batch()["image"]))
        expected = model.llm_proj(torch.nn.functional.gelu(model.vit_proj(tokens)))
        torch.testing.assert_close(model.encode_image(batch()["image"]), expected)


def test_default_checkpoint_keys_are_unchanged(models):
    """Today's default (tomeformer) keeps its module names: a checkpoint from before the option loads."""
    keys = {k.split(".")[0] for k in models["tomeformer"].state_dict() if not k.startswith(("visual_encoder", "llm."))}
    assert keys == {"ln_vision", "vit_proj", "connector", "llm_proj"}
    assert any(k.startswith("connector.encoder.layer.1.") for k in models["tomeformer"].state_dict())
    assert EVLGenConfig().connector == "tomeformer"


def test_option_errors_name_the_key_and_value():
    with pytest.raises(ValueError, match=r"connector='qformer' is not one of \('tomeformer', 'avgpool', 'mlp'\)"):
        EVLGenConfig(connector="qformer")
    with pytest.raises(ValueError, match="beta > 0 needs a BERT connector's CLS token.*connector mlp"):
        EVLGenConfig(connector="mlp", beta=0.5)
    # 65 -> 49 -> 32 tokens: 31 pooled patches tile no 8 x 8 grid; refused when the model is built.
    with pytest.raises(ValueError, match="31 pooled patches"):
        tiny("avgpool", tome_r=[16, 17])
