"""A run's config checked before anything is built (lavis_evlgen/common/run_config.py), and the
model's image size, patches, soft prompts and tome_r checked when it is built."""
import argparse
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lavis_evlgen.models
from lavis_evlgen.common.run_config import RunConfig, load_config
from lavis_evlgen.models.evlgen import EVLGen
from lavis_evlgen.models.merge import capped_merges

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "projects/evlgen/tiny/caption.yaml"


def _config(*options: str, cfg_path: Path = TINY) -> RunConfig:
    return RunConfig(argparse.Namespace(cfg_path=str(cfg_path), options=list(options) or None))


@pytest.mark.parametrize("option, key, listed", [
    ("model.arch=evlgen_nope", "model.arch: 'evlgen_nope' (from --options) is not registered", "'evlgen_opt'"),
    ("model.model_type=huge", "model.model_type: 'huge' (from --options) is not a model type of 'evlgen_opt'",
     "'pretrain_opt2.7b'"),
    ("datasets.shapes_nope.build_info.seed=1", "datasets.shapes_nope: 'shapes_nope' (from --options) is not registered",
     "'shapes_caption'"),
    ("datasets.shapes_caption.type=fancy", "datasets.shapes_caption.type: 'fancy' (from --options)", "['default']"),
    ("run.task=captionin", "run.task: 'captionin' (from --options) is not registered", "'evlgen_captioning'"),
    ("run.runner=runner_nope", "run.runner: 'runner_nope' (from --options) is not registered", "'runner_evlgen_iter'"),
])
def test_unknown_names_from_options_are_named_with_the_registered_ones(option, key, listed):
    with pytest.raises(KeyError) as error:
        _config(option)
    assert key in str(error.value) and listed in str(error.value)


def test_unknown_names_in_the_yaml_name_the_file(tmp_path):
    cfg = OmegaConf.load(TINY)
    cfg.model.arch = "evlgen_nope"
    path = tmp_path / "bad.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(KeyError, match=rf"model.arch: 'evlgen_nope' \(in {path}\) is not registered"):
        _config(cfg_path=path)


def test_model_type_from_options_chooses_the_model_defaults():
    assert _config().model_cfg.connector_init == "evlgen-tiny/bert"
    cfg = _config("model.arch=evlgen_vicuna", "model.model_type=mini")
    assert cfg.model_cfg.model_type == "mini"
    assert cfg.model_cfg.connector_init == "sentence-transformers/all-MiniLM-L6-v2"  # mini.yaml's, not tiny's
    assert cfg.model_cfg.tome_r == 18


def test_processor_image_size_must_match_the_model():
    with pytest.raises(ValueError, match=r"datasets.shapes_caption.vis_processor.eval.image_size=224 but "
                                         r"model.image_size=112"):
        _config("datasets.shapes_caption.vis_processor.eval.image_size=224")


def test_every_project_config_passes_the_checks():
    # layers/ folders hold partial configs that rows name as their base.
    for path in sorted(p for p in (REPO / "projects").rglob("*.yaml") if "layers" not in p.parts):
        _config(cfg_path=path)


def _tiny_model_cfg(**overrides):
    cfg = OmegaConf.load(lavis_evlgen.models.EVLGenOPT.default_config_path("tiny")).model
    return OmegaConf.merge(cfg, overrides)


def test_image_size_too_large_for_the_llm_positions_names_the_numbers():
    # 224 px: 257 ViT tokens -> 225 soft prompts, + 32 text tokens > the tiny OPT's 128 positions.
    with pytest.raises(ValueError, match=r"225 soft prompts \+ max_txt_len=32 text tokens = 257 positions exceed the "
                                         r"LLM 'evlgen-tiny/opt''s max_position_embeddings=128 \(the ViT "
                                         r"'evlgen-tiny/vit' gives 257 tokens at model.image_size=224\)"):
        EVLGen.from_config(_tiny_model_cfg(image_size=224))


def test_image_size_off_the_patch_grid_is_refused():
    with pytest.raises(ValueError, match=r"model.image_size=120 is not a multiple of the patch size 14 .* use 112 or 126"):
        EVLGen.from_config(_tiny_model_cfg(image_size=120))


def test_model_image_size_is_honoured_by_the_hf_vit():
    model = EVLGen.from_config(_tiny_model_cfg(image_size=56, tome_r=4))  # 4x4 patches + CLS = 17 -> 13 -> 9
    assert model.encode_image(torch.zeros(1, 3, 56, 56)).shape[1] == 9
    with pytest.raises(ValueError, match=r"images of \(112, 112\) px reach a ViT built for model.image_size=56"):
        model.encode_image(torch.zeros(1, 3, 112, 112))


def test_r_above_half_the_tokens_is_capped_with_a_warning(caplog):
    assert capped_merges(65, [16, 16]) == []
    assert capped_merges(65, [40, 40]) == [(1, 40, 32), (2, 40, 16)]
    with caplog.at_level(logging.WARNING):
        model = EVLGen.from_config(_tiny_model_cfg(tome_r=40))
    (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tome_r")]
    assert "layer 1 asks r=40 of 65 tokens, merges 32, layer 2 asks r=40 of 33 tokens, merges 16" in warning
    assert warning.endswith("tokens 65 -> 33 -> 17")
    assert model.encode_image(torch.zeros(1, 3, 112, 112)).shape[1] == 17


# ---------------------------------------------------------------- layered configs (base: ...)
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_merges_in_order_and_lists_replace(tmp_path):
    _write(tmp_path / "a.yaml", "run: {seed: 1, splits: [train, val], lr: 1.0}\nmodel: {arch: x}\n")
    _write(tmp_path / "sub/b.yaml", "base: ../a.yaml\nrun: {seed: 2, splits: [train]}\n")
    _write(tmp_path / "c.yaml", "base: [a.yaml, sub/b.yaml]\nrun: {lr: 3.0}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert OmegaConf.to_container(cfg) == {"run": {"seed": 2, "splits": ["train"], "lr": 3.0}, "model": {"arch": "x"}}


def test_base_cycle_and_missing_base_are_named(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ValueError, match=rf"base: cycle {a} -> {b} -> {a}"):
        load_config(a)
    c = _write(tmp_path / "c.yaml", "base: nope.yaml\n")
    with pytest.raises(FileNotFoundError, match=rf"config {tmp_path / 'nope.yaml'} does not exist \(base of {c}\)"):
        load_config(c)
    d = _write(tmp_path / "d.yaml", "base: 3\n")
    with pytest.raises(ValueError, match="base must be a path or a list of paths"):
        load_config(d)


def test_run_config_reads_a_layered_yaml_with_options(tmp_path):
    row = _write(tmp_path / "row.yaml", f"base: {TINY}\nrun: {{seed: 7}}\n")
    cfg = _config("run.max_epoch=3", cfg_path=row)
    assert cfg.run_cfg.seed == 7 and cfg.run_cfg.max_epoch == 3
    assert cfg.run_cfg.task == OmegaConf.load(TINY).run.task
    assert cfg.args.cfg_path == str(row)


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def test_compare_rows_are_their_base_plus_the_keys_they_change():
    rows = REPO / "projects/compare/mini"
    base = _flat(OmegaConf.to_container(load_config(rows / "base.yaml")))

    def changed(name: str) -> set[str]:
        row = _flat(OmegaConf.to_container(load_config(rows / f"{name}.yaml")))
        return {k for k in row.keys() | base.keys() if row.get(k, "<absent>") != base.get(k, "<absent>")}

    assert changed("evlgen_two_layers") == {"run.output_dir"}
    assert changed("evlgen_half_depth") == {"model.num_layers", "model.tome_r", "run.output_dir"}
    assert changed("evlgen_tenth_data") == {"model.num_layers", "model.tome_r", "run.output_dir",
                                            "datasets.shapes_caption.build_info.fraction"}
    assert changed("blip2_stage1") == {"model.arch", "run.output_dir", "run.valid_splits", "run.test_splits"}
