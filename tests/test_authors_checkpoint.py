"""The EVLGen authors' released checkpoints (their ``liptome_*`` layout, models/authors_layout.py)
load into our models and compute what the model they were taken from computes.

The checkpoints are built here at tiny size: a tiny model's trainable weights (moved off their
initial values), renamed to the authors' names (written out below, independently of the loader),
plus the extra tensors LAVIS's ``save_checkpoint`` keeps for their models, inside LAVIS's saved dict.
"""
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from lavis_evlgen.common.checkpoint import CheckpointMismatchError, trainable_state_dict
from lavis_evlgen.models import EVLGenOPT, EVLGenVicuna, EVLGenVideoOPT

THEIR_NAMES = {"vit_proj.": "VL_proj.", "connector.": "VLconnector."}
OUR_TEMPORAL = re.compile(r"^visual_encoder\..*\.layer\.(\d+)\.temporal_merge\.")


def build(cls, seed, **overrides):
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model, overrides)
    return cls.from_config(cfg).eval()


def moved(model, seed=1):
    """``model`` with every trainable tensor moved off its initial value (alpha of the temporal modules off 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def their_key(key: str, llm_proj: str) -> str:
    for ours, theirs in {**THEIR_NAMES, "llm_proj.": f"{llm_proj}."}.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    match = OUR_TEMPORAL.match(key)
    if match:
        return f"visual_encoder.blocks.{match[1]}.temporal_merge." + key[match.end():]
    return key


def authors_checkpoint(model, arch: str | None, llm_proj: str = "opt_proj") -> dict:
    """LAVIS's saved dict of an authors' model holding ``model``'s trainable weights, with what LAVIS
    saves besides them: BERT word embeddings, pooler and position ids, and per LLM a tied output
    head (OPT) or rotary buffers (LLaMA)."""
    width = model.connector.hidden_size
    g = torch.Generator().manual_seed(7)
    state = {their_key(k, llm_proj): v.clone() for k, v in trainable_state_dict(model).items()}
    state.update({
        "VLconnector.embeddings.word_embeddings.weight": torch.randn(30, width, generator=g),
        "VLconnector.embeddings.position_ids": torch.arange(512).unsqueeze(0),
        "VLconnector.pooler.dense.weight": torch.randn(width, width, generator=g),
        "VLconnector.pooler.dense.bias": torch.randn(width, generator=g),
    })
    if llm_proj == "opt_proj":
        state["opt_model.lm_head.weight"] = model.llm.get_input_embeddings().weight.detach().clone()
    else:
        for layer in range(model.llm.config.num_hidden_layers):
            state[f"llm_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(4, generator=g)
    first = next(iter(state))
    return {
        "model": state,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(state[first])}},
                      "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "params": [0]}]},
        "config": {"model": {"arch": arch, "model_type": "tiny"}, "run": {"task": "captioning"}} if arch else {},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
        "epoch": 4,
    }


def images(batch=2):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def samples():
    return {"image": images(), "text_input": ["a red circle on the left", "two blue squares"]}


@pytest.fixture(scope="module")
def opt_original():
    return moved(build(EVLGenOPT, seed=0))


@pytest.fixture(scope="module")
def opt_checkpoint(opt_original, tmp_path_factory):
    path = tmp_path_factory.mktemp("authors") / "liptome_opt.pth"
    torch.save(authors_checkpoint(opt_original, "liptome_opt"), path)
    return path


def test_opt_checkpoint_loads_and_computes_what_the_original_computes(opt_original, opt_checkpoint, caplog):
    model = build(EVLGenOPT, seed=1)
    with torch.no_grad():
        expected, loss = opt_original.encode_image(images()), opt_original(samples())["loss"]
        assert not torch.equal(model.encode_image(images()), expected)  # not vacuous: another init differs
        with caplog.at_level(logging.INFO):
            report = model.load_checkpoint(str(opt_checkpoint))
        assert torch.equal(model.encode_image(images()), expected)
        assert torch.equal(model(samples())["loss"], loss)
    trainable = trainable_state_dict(opt_original)
    assert report.loaded == sorted(trainable)
    assert report.dropped == {
        "BERT word embeddings": ["VLconnector.embeddings.word_embeddings.weight"],
        "BERT index buffers": ["VLconnector.embeddings.position_ids"],
        "BERT pooler": ["VLconnector.pooler.dense.weight", "VLconnector.pooler.dense.bias"],
        "OPT output head tied to its input embeddings": ["opt_model.lm_head.weight"],
    }
    frozen = len(model.state_dict()) - len(trainable)
    assert [r.getMessage() for r in caplog.records] == [
        f"Loaded checkpoint {opt_checkpoint}: {len(trainable)} tensors loaded, {frozen} frozen tensors kept from the "
        "model; the EVLGen authors' layout (liptome_opt), 5 unused tensors dropped (BERT word embeddings: 1, "
        "BERT index buffers: 1, BERT pooler: 2, OPT output head tied to its input embeddings: 1)."
    ]


@pytest.mark.parametrize("flag, key", [("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")])
def test_the_config_keys_load_it(opt_original, opt_checkpoint, flag, key):
    model = build(EVLGenOPT, seed=2, **{flag: True, key: str(opt_checkpoint)})
    with torch.no_grad():
        assert torch.equal(model.encode_image(images()), opt_original.encode_image(images()))


def test_vicuna_checkpoint_with_llm_proj_and_rotary_buffers(tmp_path):
    original = moved(build(EVLGenVicuna, seed=0))
    path = tmp_path / "liptome_vicuna.pth"
    torch.save(authors_checkpoint(original, "liptome_vicuna", llm_proj="llm_proj"), path)
    model = build(EVLGenVicuna, seed=1)
    report = model.load_checkpoint(str(path))
    assert len(report.dropped["LLM rotary frequency buffers"]) == original.llm.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(model(samples())["loss"], original(samples())["loss"])
    # Its arch is evlgen_vicuna's: the OPT model refuses it, naming both.
    with pytest.raises(CheckpointMismatchError, match="arch 'evlgen_vicuna' \\(this model: 'evlgen_opt'\\)"):
        build(EVLGenOPT, seed=1).load_checkpoint(str(path))


def test_a_checkpoint_without_a_run_config_is_checked_by_keys_and_shapes(opt_original, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"model": authors_checkpoint(opt_original, None)["model"]}, path)
    report = build(EVLGenOPT, seed=1).load_checkpoint(str(path))
    assert report.layout == "the EVLGen authors' layout (no run config)"


def test_anything_else_that_does_not_fit_is_an_error_naming_it(opt_original, tmp_path):
    base = authors_checkpoint(opt_original, "liptome_opt")
    width = opt_original.connector.hidden_size
    cases = {
        "extra_layer": ({"VLconnector.encoder.layer.5.output.dense.bias": torch.zeros(width)},
                        r"1 keys the model .* does not have: \['connector\.encoder\.layer\.5\.output\.dense\.bias "
                        r"\(checkpoint: VLconnector\.encoder\.layer\.5\.output\.dense\.bias\)'\]"),
        "qformer": ({"Qformer.bert.embeddings.LayerNorm.weight": torch.zeros(width)},
                    r"does not have: \['Qformer\.bert\.embeddings\.LayerNorm\.weight'\]"),
        "shape": ({"VL_proj.weight": torch.zeros(width, 3)},
                  r"vit_proj\.weight \(checkpoint: VL_proj\.weight\): checkpoint \(\d+, 3\), model"),
        "temporal": ({"visual_encoder.blocks.0.temporal_merge.alpha": torch.zeros(())},
                     r"does not have: \['visual_encoder\.blocks\.0\.temporal_merge\.alpha'\]"),
    }
    model = build(EVLGenOPT, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (extra, message) in cases.items():
        torch.save({**base, "model": {**base["model"], **extra}}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointMismatchError, match=message):
            model.load_checkpoint(str(tmp_path / f"{name}.pth"))
    missing = {k: v for k, v in base["model"].items() if k != "opt_proj.bias"}
    torch.save({**base, "model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match=r"1 trainable keys are missing: \['llm_proj\.bias'\]"):
        model.load_checkpoint(str(tmp_path / "missing.pth"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_video_checkpoint_with_temporal_modules(tmp_path):
    original = moved(build(EVLGenVideoOPT, seed=0))
    clip = {"video": torch.randn(2, 3, 4, 112, 112, generator=torch.Generator().manual_seed(0))}
    checkpoint = authors_checkpoint(original, "liptome_video_opt")
    assert sum(".temporal_merge." in k for k in checkpoint["model"]) == 10  # 2 blocks x (alpha, query, key)
    assert all(k.startswith("visual_encoder.blocks.") for k in checkpoint["model"] if ".temporal_merge." in k)
    torch.save(checkpoint, tmp_path / "liptome_video_opt.pth")
    model = build(EVLGenVideoOPT, seed=1)
    report = model.load_checkpoint(str(tmp_path / "liptome_video_opt.pth"))
    assert report.fresh == {}
    with torch.no_grad():
        assert torch.equal(model.encode_visual(clip), original.encode_visual(clip))
