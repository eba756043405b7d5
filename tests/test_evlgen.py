"""EVLGen-image at tiny size: shapes, gradients, freezing, generation, loading through LAVIS."""
import logging

import pytest
import torch
from lavis.models import load_model, load_model_and_preprocess
from omegaconf import OmegaConf

import lavis_evlgen
from lavis_evlgen.common.checkpoint import CheckpointMismatchError
from lavis_evlgen.models import EVLGen, EVLGenConfig

ARCHS = ["evlgen_opt", "evlgen_vicuna"]


def tiny_cfg(arch, **overrides):
    cfg = OmegaConf.load(lavis_evlgen.models.EVLGenOPT.default_config_path("tiny") if arch == "evlgen_opt"
                         else lavis_evlgen.models.EVLGenVicuna.default_config_path("tiny")).model
    return OmegaConf.merge(cfg, overrides)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return load_model(request.param, "tiny")


def batch(size=2, image_size=112):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(size, 3, image_size, image_size, generator=g),
        "text_input": ["a red circle on the left", "two blue squares"][:size],
    }


def test_soft_prompt_count_matches_connector(model):
    prefix = model.encode_image(batch()["image"])
    tokens = 1 + (112 // 14) ** 2  # CLS + 8x8 patches
    assert prefix.shape == (2, model.connector.output_token_count(tokens), model.llm.config.hidden_size)
    assert prefix.shape[1] == 33  # 65 -> 49 -> 33 with 2 layers of r=16


def test_only_connector_parts_train(model):
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ln_vision", "vit_proj", "connector", "llm_proj"}
    assert model.num_trainable_parameters() == sum(
        p.numel() for m in (model.ln_vision, model.vit_proj, model.connector, model.llm_proj) for p in m.parameters()
    )


def test_forward_backward_reaches_connector_not_frozen_parts(model):
    model.train()
    model.zero_grad()
    out = model(batch())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name in ("ln_vision", "vit_proj", "llm_proj"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.visual_encoder.parameters())
    # frozen parts stay in eval mode even after model.train()
    assert not model.llm.training and not model.visual_encoder.training and model.connector.training


def test_loss_depends_on_image_and_is_per_token_mean(model):
    model.eval()
    one = batch(1)
    with torch.no_grad():
        single = model(one)["loss"]
        pair = model({"image": one["image"].repeat(2, 1, 1, 1), "text_input": one["text_input"] * 2})["loss"]
        other_image = model({**one, "image": one["image"] + 3.0})["loss"]
    torch.testing.assert_close(single, pair)
    assert not torch.allclose(single, other_image)


def test_overfits_one_batch(model):
    """The connector alone moves the caption loss down: the training signal is wired.

    (A tiny random LLM has near-uniform logits, so the drop is small but far above noise: a broken
    path gives exactly the same loss every step.)"""
    model.train()
    samples = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(samples)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.1


def test_generate_and_predict_answers(model):
    model.eval()
    samples = batch()
    captions = model.generate(samples, num_beams=2, max_length=5, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    many = model.generate(samples, num_beams=3, max_length=4, num_captions=3)
    assert len(many) == 6
    sampled = model.generate(samples, use_nucleus_sampling=True, max_length=4, num_captions=2)
    assert len(sampled) == 4
    answers = model.predict_answers({**samples, "text_input": ["what color?", "how many shapes?"]}, max_len=3)
    assert len(answers) == 2


def test_generate_is_deterministic_with_beams(model):
    model.eval()
    samples = batch()
    assert model.generate(samples, num_beams=2, max_length=5) == model.generate(samples, num_beams=2, max_length=5)


def test_load_model_and_preprocess_registers_and_lists():
    names = dict(lavis_evlgen.model_zoo())
    assert set(names["evlgen_opt"]) >= {"pretrain_opt2.7b", "pretrain_opt6.7b", "tiny"}
    assert set(names["evlgen_vicuna"]) >= {"pretrain_vicuna7b", "tiny"}
    model, vis, txt = load_model_and_preprocess("evlgen_opt", "tiny", is_eval=True)
    assert isinstance(model, EVLGen) and not model.training
    from PIL import Image

    image = vis["eval"](Image.new("RGB", (200, 150), "red"))
    assert image.shape == (3, 112, 112)
    assert txt["eval"]("A Red  Circle.") == "a red circle"


def test_unknown_config_key_is_named():
    with pytest.raises(KeyError, match="tome_rr"):
        EVLGenConfig.from_dict({"arch": "evlgen_opt", "tome_rr": 3})


def test_missing_pretrained_part_names_key_and_path(tmp_path):
    cfg = tiny_cfg("evlgen_opt", llm_model=str(tmp_path / "no-such-llm"))
    with pytest.raises(FileNotFoundError, match="llm_model") as err:
        EVLGen.from_config(cfg)
    assert "no-such-llm" in str(err.value)


def test_checkpoint_roundtrip_holds_only_trainable_weights(model, tmp_path, caplog):
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": trainable}, path)
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(1.0)
    with caplog.at_level(logging.INFO):
        report = model.load_checkpoint(path)
    for n, p in model.named_parameters():
        if n in trainable:
            torch.testing.assert_close(p, trainable[n])

    # One line, in the log and as a REPL's echo of the report: the file and counts, no key names.
    frozen = len(model.state_dict()) - len(trainable)
    summary = f"{path}: {len(trainable)} tensors loaded, {frozen} frozen tensors kept from the model"
    assert [r.getMessage() for r in caplog.records] == [f"Loaded checkpoint {summary}."]
    assert repr(report) == f"LoadReport({summary})"

    torch.save({"model": {**trainable, "not_a_param": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"bad\.pth: 1 keys .*not_a_param"):
        model.load_checkpoint(str(tmp_path / "bad.pth"))
    del trainable[next(n for n in trainable if n.startswith("connector."))]
    torch.save({"model": trainable}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"partial\.pth: 1 trainable keys are missing"):
        model.load_checkpoint(str(tmp_path / "partial.pth"))


def test_contrastive_term_adds_loss():
    torch.manual_seed(0)
    model = EVLGen.from_config(tiny_cfg("evlgen_opt", beta=0.5, sentence_encoder="evlgen-tiny/bert"))
    out = model(batch())
    assert torch.isfinite(out["loss_itc"])
    torch.testing.assert_close(out["loss"], out["loss_lm"] + 0.5 * out["loss_itc"])
    out["loss"].backward()
    assert model.contrastive_proj.weight.grad is not None
    assert all(p.grad is None for p in model.sentence_encoder.parameters())


@pytest.mark.parametrize("ablation", ["zero", "shuffle"])
def test_prefix_ablation_for_blind_baselines(ablation):
    torch.manual_seed(0)
    plain = EVLGen.from_config(tiny_cfg("evlgen_opt"))
    torch.manual_seed(0)
    blind = EVLGen.from_config(tiny_cfg("evlgen_opt", prefix_ablation=ablation))
    plain.eval(), blind.eval()
    image = batch()["image"]
    seen, unseen = plain.encode_image(image), blind.encode_image(image)
    expected = torch.zeros_like(seen) if ablation == "zero" else seen.roll(1, dims=0)
    torch.testing.assert_close(unseen, expected)


def test_bad_prefix_ablation_is_named():
    with pytest.raises(ValueError, match="blind"):
        EVLGenConfig.from_dict({"prefix_ablation": "blind"})


def test_vit_layer_feeds_the_connector_the_output_of_that_block():
    torch.manual_seed(0)
    full = EVLGen.from_config(tiny_cfg("evlgen_vicuna"))
    torch.manual_seed(0)
    cut = EVLGen.from_config(tiny_cfg("evlgen_vicuna", vit_layer=1))
    image = batch()["image"]
    # The tiny ViT has 2 blocks; block 1's output is the full encoder's first hidden state.
    expected = full.visual_encoder.model(pixel_values=image, output_hidden_states=True).hidden_states[1]
    assert len(cut.visual_encoder.model.encoder.layer) == 1
    torch.testing.assert_close(cut.visual_encoder(image), expected)
    assert cut.encode_image(image).shape == full.encode_image(image).shape


@pytest.mark.parametrize("layer", [0, 3])
def test_vit_layer_out_of_range_is_named(layer):
    with pytest.raises(ValueError, match=r"vit_layer must be in \[1, 2\]"):
        EVLGen.from_config(tiny_cfg("evlgen_vicuna", vit_layer=layer))


def test_vit_layer_refused_for_lavis_vits():
    from lavis_evlgen.models.vision import build_vision_encoder

    with pytest.raises(ValueError, match="vit_layer=8.*eva_clip_g"):
        build_vision_encoder("eva_clip_g", 224, layer=8)
