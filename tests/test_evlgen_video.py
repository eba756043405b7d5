"""EVLGen-video at tiny size (models/evlgen_video.py): the image model on static clips, the modes of
the MSR-VTT table, where gradients go, frame order, image checkpoints, generation, SCST, and a
train.py smoke run on the shapes video world."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf

import lavis_evlgen
from lavis_evlgen.common.checkpoint import CheckpointMismatchError, load_checkpoint, trainable_state_dict
from lavis_evlgen.common.run_config import load_config
from lavis_evlgen.models import EVLGenVicuna, EVLGenVideoConfig, EVLGenVideoOPT, EVLGenVideoVicuna
from lavis_evlgen.models.temporal import TemporalAttention, temporal_parameters
from launch import subprocess_env
from test_run_config import _flat

REPO = Path(__file__).resolve().parents[1]
CONNECTOR_PARTS = {"ln_vision", "vit_proj", "connector", "llm_proj"}
PROMPTS = 33  # soft prompts per clip (per frame in concat): 65 ViT tokens, 2 TomeFormer layers of r=16


def tiny_cfg(cls, **overrides):
    return OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model, overrides)


def build(cls=EVLGenVideoVicuna, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls.from_config(tiny_cfg(cls, **overrides)).eval()


@pytest.fixture(scope="module")
def image_model():
    return build(EVLGenVicuna)


@pytest.fixture(scope="module")
def video_model():
    return build(video_mode="video")


def images(batch=2, seed=0):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def clip(batch=2, frames=4, seed=0):
    """[B, C, T, H, W] of T different frames."""
    return torch.randn(batch, 3, frames, 112, 112, generator=torch.Generator().manual_seed(seed))


def static(image, frames):
    """T copies of each image: [B, C, H, W] -> [B, C, T, H, W]."""
    return image.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


def randomise_temporal(model, seed=0, std=0.3, alpha=0.5):
    """Nonzero query/key, frame embeddings and alpha: the temporal modules now change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TemporalAttention):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                module.alpha.fill_(alpha)


CAPTIONS = ["a red circle moves left", "a blue square appears"]


# ---------------------------------------------------------------- registration and configs


def test_registered_with_model_types_and_no_separate_scst_arch():
    zoo = dict(lavis_evlgen.model_zoo())
    assert set(zoo["evlgen_video_opt"]) == {"pretrain_opt2.7b", "tiny"}
    assert set(zoo["evlgen_video_vicuna"]) == {"pretrain_vicuna7b", "mini", "tiny"}
    assert not [name for name in zoo if name.endswith("_scst")]
    model = load_model("evlgen_video_opt", "tiny")
    assert isinstance(model, EVLGenVideoOPT) and model.config.video_mode == "video" and model.config.num_frames == 4


def test_model_types_are_the_image_types_plus_the_video_keys():
    """Each video model type holds its image model type's keys unchanged (the mini one mirrors
    evlgen_vicuna/mini.yaml, so a checkpoint of one loads into the other), and video processors."""
    video_keys = {"video_mode", "temporal_pos_embed", "num_frames"}
    pairs = [("evlgen_video_opt", "pretrain_opt2.7b", "evlgen_opt", "pretrain_opt2.7b"),
             ("evlgen_video_vicuna", "pretrain_vicuna7b", "evlgen_vicuna", "pretrain_vicuna7b"),
             ("evlgen_video_vicuna", "mini", "evlgen_vicuna", "mini"),
             ("evlgen_video_opt", "tiny", "evlgen_opt", "tiny"), ("evlgen_video_vicuna", "tiny", "evlgen_vicuna", "tiny")]
    root = REPO / "lavis_evlgen/configs/models"
    for arch, model_type, image_arch, image_type in pairs:
        video = OmegaConf.load(root / arch / f"{model_type}.yaml")
        image = OmegaConf.load(root / image_arch / f"{image_type}.yaml")
        video_model = {k: v for k, v in video.model.items() if k not in video_keys | {"arch"}}
        assert video_model == {k: v for k, v in image.model.items() if k != "arch"}, (arch, model_type)
        assert video.model.arch == arch and video.model.num_frames == 4 and video.model.video_mode == "video"
        size = image.model.image_size
        for split, processor in video.preprocess.vis_processor.items():
            assert processor.n_frms == 4 and processor.image_size == size, (arch, model_type, split)
            assert processor.name in ("alpro_video_train", "alpro_video_eval", "evlgen_video_headtail")
            image_processor = image.preprocess.vis_processor[split]
            assert processor.get("mean") == image_processor.get("mean")  # the ViT's normalisation


def _project(path):
    import argparse

    from lavis_evlgen.common.run_config import RunConfig

    cfg = RunConfig(argparse.Namespace(cfg_path=str(REPO / path), options=None))
    return cfg, EVLGenVideoConfig.from_dict(cfg.model_cfg)


def test_project_configs_are_the_msrvtt_rows_and_the_authors_recipe():
    """One LAVIS config per MSR-VTT row on the mini world; they parse, and their model sections validate."""
    rows = {"concat": ("concat", False, "pretrained"), "mean": ("mean", False, "pretrained"),
            "image": ("image", False, "finetuned"), "video": ("video", False, "pretrained"),
            "video_scst": ("video", True, "pretrained")}
    for name, (mode, scst, start) in rows.items():
        cfg, model = _project(f"projects/video/mini/{name}.yaml")
        assert (cfg.model_cfg.arch, cfg.model_cfg.model_type, model.video_mode, model.scst) == (
            "evlgen_video_vicuna", "mini", mode, scst), name
        assert cfg.model_cfg[f"load_{start}"] and cfg.model_cfg[start] is None, name  # a checkpoint is required
        assert cfg.run_cfg.evaluate == (name == "image") and list(cfg.datasets_cfg) == ["shapes_video_caption"]
        assert all(p.n_frms == 4 and p.image_size == 112 for p in cfg.datasets_cfg.shapes_video_caption.vis_processor.values())

    # Each row is the shared base.yaml plus the keys that make it that row.
    base = _flat(OmegaConf.to_container(load_config(REPO / "projects/video/mini/base.yaml")))

    def changed(name: str) -> set[str]:
        row = _flat(OmegaConf.to_container(load_config(REPO / f"projects/video/mini/{name}.yaml")))
        return {k for k in row.keys() | base.keys() if row.get(k, "<absent>") != base.get(k, "<absent>")}

    assert changed("video") == changed("mean") == changed("concat") == {"model.video_mode", "run.output_dir"}
    assert changed("image") == {"model.video_mode", "model.load_pretrained", "model.load_finetuned", "model.finetuned",
                                "run.evaluate", "run.train_splits", "run.valid_splits", "run.test_splits",
                                "run.output_dir"}
    assert {k for k in changed("video_scst") if not k.startswith("model.scst")} == {
        "model.video_mode", "run.max_iters", "run.iters_per_inner_epoch", "run.init_lr", "run.min_lr", "run.warmup_lr", "run.warmup_steps",
        "run.output_dir"}

    cfg, model = _project("projects/video/msrvtt/caption.yaml")
    run = cfg.run_cfg
    assert (cfg.model_cfg.arch, cfg.model_cfg.model_type, model.video_mode, model.num_frames) == (
        "evlgen_video_opt", "pretrain_opt2.7b", "video", 4)
    assert (run.runner, run.max_iters, run.lr_sched, run.init_lr, run.min_lr, run.warmup_lr, run.warmup_steps) == (
        "runner_evlgen_iter", 50000, "linear_warmup_cosine_lr", 1e-5, 1e-6, 1e-8, 1000)
    assert (run.batch_size_train, run.num_beams, run.max_len, run.min_len) == (4, 5, 20, 5)
    processors = cfg.datasets_cfg.msrvtt_cap.vis_processor
    assert all(p.n_frms == 4 and p.image_size == 224 for p in processors.values())


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="video_mode must be one of"):
        EVLGenVideoConfig.from_dict({"video_mode": "average"})
    with pytest.raises(ValueError, match="temporal_pos_embed .* needs video_mode 'video'"):
        EVLGenVideoConfig.from_dict({"video_mode": "mean", "temporal_pos_embed": True})
    with pytest.raises(ValueError, match="num_frames"):
        EVLGenVideoConfig.from_dict({"num_frames": 0})
    with pytest.raises(ValueError, match="'image' .* does not train"):
        EVLGenVideoConfig.from_dict({"video_mode": "image", "scst": True, "scst_references": "refs.json"})
    with pytest.raises(ValueError, match="concat"):
        EVLGenVideoConfig.from_dict({"video_mode": "concat", "beta": 0.5})
    with pytest.raises(ValueError, match="scst_references"):  # the inherited checks still run
        EVLGenVideoConfig.from_dict({"scst": True})
    with pytest.raises(KeyError, match="num_frame"):
        EVLGenVideoConfig.from_dict({"num_frame": 4})


# ---------------------------------------------------------------- what each mode computes


@pytest.mark.parametrize("mode", ["video", "mean", "image"])
def test_static_clip_is_the_image_model_at_init(mode, image_model):
    """Same seed, same weights; a clip of T copies of an image gives the image model's soft prompts,
    loss and captions (video: the temporal modules start as the identity)."""
    model = build(video_mode=mode)
    image = images()
    with torch.no_grad():
        expected = image_model.encode_image(image)
        for frames in (1, 4):
            video = static(image, frames)
            torch.testing.assert_close(model.encode_visual({"video": video}), expected)
            torch.testing.assert_close(model({"video": video, "text_input": CAPTIONS})["loss"],
                                       image_model({"image": image, "text_input": CAPTIONS})["loss"])
    assert (model.generate({"video": static(image, 4)}, num_beams=2, max_length=5)
            == image_model.generate({"image": image}, num_beams=2, max_length=5))


def test_concat_gives_each_frames_soft_prompts_in_order(image_model):
    for frames in (1, 4, 8):
        model = build(video_mode="concat", num_frames=frames)
        video = clip(frames=frames)
        with torch.no_grad():
            prefix = model.encode_visual({"video": video})
            assert prefix.shape == (2, frames * PROMPTS, model.llm.config.hidden_size)
            for t in range(frames):  # block t is the image model's soft prompts of frame t
                torch.testing.assert_close(prefix[:, t * PROMPTS:(t + 1) * PROMPTS], image_model.encode_image(video[:, :, t]))
    with pytest.raises(ValueError, match=r"concat.*num_frames=8.*T=4"):
        model.encode_visual({"video": clip(frames=4)})


@pytest.mark.parametrize("mode", ["video", "mean"])
@pytest.mark.parametrize("frames", [1, 4, 8])
def test_any_number_of_frames(mode, frames, video_model):
    model = video_model if mode == "video" else build(video_mode=mode)
    video = clip(frames=frames)
    with torch.no_grad():
        prefix = model.encode_visual({"video": video})
        out = model({"video": video, "text_input": CAPTIONS})
    assert prefix.shape == (2, PROMPTS, model.llm.config.hidden_size) and torch.isfinite(out["loss"])


def test_mean_is_the_image_model_on_the_mean_of_the_frames_vit_tokens(image_model):
    model = build(video_mode="mean")
    video = clip()
    with torch.no_grad():
        tokens = torch.stack([image_model.visual_encoder(video[:, :, t]) for t in range(4)], 1).mean(1)
        hidden, _ = image_model.connect(image_model.ln_vision(tokens))
        torch.testing.assert_close(model.encode_visual({"video": video}), image_model.llm_proj(hidden))


def test_only_video_mode_has_temporal_modules():
    for mode in ("mean", "concat", "image"):
        model = build(video_mode=mode)
        assert not any(isinstance(m, TemporalAttention) for m in model.modules()), mode
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == CONNECTOR_PARTS
        assert model.fresh_key_groups() == {}


def test_video_mode_gradients_reach_only_temporal_modules_and_connector(video_model):
    model = build(video_mode="video")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    temporal = {n for n in trainable if ".temporal_merge." in n}
    assert len(temporal) == 2 * 5 and all(n.startswith("visual_encoder.") for n in temporal)  # 2 blocks x 5 tensors
    assert {n.split(".")[0] for n in trainable - temporal} == CONNECTOR_PARTS
    assert {id(p) for p in temporal_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in temporal}

    model.train()
    model({"video": clip(), "text_input": CAPTIONS})["loss"].backward()
    # At init (alpha = 0) only alpha can move the temporal modules off the identity, and it gets a gradient.
    assert all(m.alpha.grad is not None and m.alpha.grad.abs() > 0 for m in model.modules() if isinstance(m, TemporalAttention))

    model.zero_grad(set_to_none=True)
    randomise_temporal(model)
    model({"video": clip(), "text_input": CAPTIONS})["loss"].backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name  # the ViT's own weights and the LLM
    # frozen parts stay in eval mode after model.train()
    assert not model.visual_encoder.training and not model.llm.training and model.connector.training


def test_reversing_the_frames_matters_only_with_the_frame_position_embedding():
    video = clip()
    reversed_video = video.flip(2)
    plain, ordered, mean = build(video_mode="video"), build(video_mode="video", temporal_pos_embed=True), build(video_mode="mean")
    randomise_temporal(plain)
    randomise_temporal(ordered)
    with torch.no_grad():
        out = plain.encode_visual({"video": video})
        assert (out - mean.encode_visual({"video": video})).abs().max() > 1e-3  # the modules act
        torch.testing.assert_close(plain.encode_visual({"video": reversed_video}), out, rtol=1e-5, atol=1e-5)
        diff = ordered.encode_visual({"video": reversed_video}) - ordered.encode_visual({"video": video})
    assert diff.abs().max() > 1e-3


def test_frame_count_and_layout_errors(video_model):
    with pytest.raises(ValueError, match=r"more than the 4 the frame position embedding covers"):
        build(video_mode="video", temporal_pos_embed=True).encode_visual({"video": clip(frames=8)})
    build(video_mode="video", temporal_pos_embed=True).encode_visual({"video": clip(frames=2)})  # fewer is fine
    with pytest.raises(ValueError, match=r"\[B, C=3, T, H, W\].*transpose\(1, 2\)"):
        video_model.encode_visual({"video": clip(frames=4).transpose(1, 2)})
    with pytest.raises(ValueError, match=r"\[B, C=3, T, H, W\]"):
        video_model.encode_visual({"video": images()})
    with pytest.raises(KeyError, match=r"samples\['video'\]"):
        video_model.generate({"image": images()})


def test_image_mode_is_evaluation_only():
    model = build(video_mode="image").train()
    with pytest.raises(RuntimeError, match="evaluation only"):
        model({"video": clip(), "text_input": CAPTIONS})
    with torch.no_grad():  # LAVIS evaluates in eval mode, but decoding never trains anyway
        assert len(model.generate({"video": clip()}, num_beams=1, max_length=3)) == 2


# ---------------------------------------------------------------- decoding


def test_generate_and_predict_answers_on_video(video_model):
    samples = {"video": clip()}
    captions = video_model.generate(samples, num_beams=2, max_length=5, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert len(video_model.generate(samples, num_beams=3, max_length=4, num_captions=3)) == 6
    assert len(video_model.generate(samples, use_nucleus_sampling=True, max_length=4, num_captions=2)) == 4
    assert len(video_model.predict_answers({**samples, "text_input": ["what moves?", "what colour?"]}, max_len=3)) == 2


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory, image_model):
    """A trained-looking EVLGen-image checkpoint: the tiny image model's trainable weights, moved,
    with the arch and model type that wrote them, as the runner saves them."""
    state = trainable_state_dict(image_model)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path_factory.mktemp("ckpt") / "image.pth"
    torch.save({"model": state, "arch": "evlgen_vicuna", "model_type": "tiny"}, path)
    return path


def test_image_checkpoint_loads_and_names_the_temporal_keys_as_new(image_checkpoint, caplog):
    image = build(EVLGenVicuna, seed=1)
    image.load_checkpoint(str(image_checkpoint))
    model = build(video_mode="video", seed=2)
    temporal = sorted(n for n in model.state_dict() if ".temporal_merge." in n)
    with caplog.at_level(logging.INFO):
        report = model.load_checkpoint(str(image_checkpoint))
    state = torch.load(image_checkpoint)["model"]
    frozen = len(model.state_dict()) - len(state) - len(temporal)
    reason = "temporal modules, which an image checkpoint lacks"
    assert [r.getMessage() for r in caplog.records] == [
        f"Loaded checkpoint {image_checkpoint}: {len(state)} tensors loaded, {frozen} frozen tensors kept from the "
        f"model; {len(temporal)} new tensors initialised by the model ({reason}): {', '.join(temporal)}."
    ]
    assert report.fresh == {reason: temporal} and len(report.missing_frozen) == frozen
    # The loaded video model is the loaded image model on a static clip (temporal modules: identity).
    with torch.no_grad():
        torch.testing.assert_close(model.encode_visual({"video": static(images(), 4)}), image.encode_image(images()))
    # mean and image modes load the image checkpoint with nothing new.
    for mode in ("mean", "image"):
        assert build(video_mode=mode).load_checkpoint(str(image_checkpoint)).fresh == {}


def test_image_checkpoint_loads_from_the_config_only_from_the_image_model_of_the_same_type(image_checkpoint, tmp_path):
    def from_config(path):
        return EVLGenVideoVicuna.from_config(tiny_cfg(EVLGenVideoVicuna, model_type="tiny", load_pretrained=True,
                                                      pretrained=str(path)))

    from_config(image_checkpoint)  # written by evlgen_vicuna, type tiny: EVLGen-image of this decoder
    checkpoint = torch.load(image_checkpoint)
    for key, value in (("arch", "evlgen_opt"), ("model_type", "mini")):
        torch.save({**checkpoint, key: value}, tmp_path / f"{key}.pth")
        with pytest.raises(CheckpointMismatchError, match=f"another model: {key} '{value}'"):
            from_config(tmp_path / f"{key}.pth")


def test_every_other_mismatch_is_still_an_error(image_checkpoint, tmp_path):
    model = build(video_mode="video")
    video_state = trainable_state_dict(model)

    def save(name, state):
        torch.save({"model": state}, tmp_path / name)
        return str(tmp_path / name)

    alpha = next(k for k in video_state if k.endswith("temporal_merge.alpha"))
    partial = save("partial.pth", {k: v for k, v in video_state.items() if k != alpha})
    with pytest.raises(CheckpointMismatchError, match=rf"partial\.pth: 1 trainable keys are missing: \['{alpha}'\]"):
        model.load_checkpoint(partial)  # some temporal keys but not all: not an image checkpoint
    image_state = torch.load(image_checkpoint)["model"]
    connector_key = next(k for k in image_state if k.startswith("connector."))
    no_connector = save("no_connector.pth", {k: v for k, v in image_state.items() if k != connector_key})
    with pytest.raises(CheckpointMismatchError, match="1 trainable keys are missing"):
        model.load_checkpoint(no_connector)
    video_ckpt = save("video.pth", video_state)
    with pytest.raises(CheckpointMismatchError, match=r"video\.pth: 10 keys the model .* does not have"):
        build(EVLGenVicuna).load_checkpoint(video_ckpt)  # a video checkpoint into the image model
    with pytest.raises(CheckpointMismatchError, match="10 keys the model"):
        build(video_mode="mean").load_checkpoint(video_ckpt)
    model.load_checkpoint(video_ckpt)  # its own kind loads as is

    # A video checkpoint trained without frame embeddings into a model with them: only those are new.
    ordered = build(video_mode="video", temporal_pos_embed=True)
    report = ordered.load_checkpoint(video_ckpt)
    assert [len(keys) for keys in report.fresh.values()] == [2]
    assert all(k.endswith("temporal_merge.frame_pos_embed") for keys in report.fresh.values() for k in keys)


# ---------------------------------------------------------------- SCST


def test_scst_forward_on_video(tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"0": ["a red circle moves left"], "1": ["a blue square appears"]}))
    model = build(video_mode="video", scst=True, scst_references=str(refs), scst_group_size=3, scst_max_len=6)
    randomise_temporal(model, alpha=0.1)
    samples = {"video": clip(), "text_input": CAPTIONS, "image_id": torch.tensor([0, 1])}
    model.train()
    torch.manual_seed(0)
    step = model.scst_step(samples)
    assert len(step["captions"]) == 6
    # Make one sampled caption per clip its reference: a nonzero reward, so a learning signal.
    refs.write_text(json.dumps({"0": [step["captions"][0]], "1": [step["captions"][3]]}))
    model.__dict__.pop("_scst_state", None)
    torch.manual_seed(0)
    out = model(samples)
    assert set(out) == {"loss", "loss_scst", "reward"} and out["reward"] > 0
    out["loss"].backward()
    for name, param in model.named_parameters():
        if ".temporal_merge." in name or name.split(".")[0] in CONNECTOR_PARTS:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    assert sum(p.grad.abs().sum() for p in temporal_parameters(model)) > 0
    model.eval()
    with torch.no_grad():
        assert set(model(samples)) == {"loss", "loss_lm"}  # eval: the captioning loss


# ---------------------------------------------------------------- LAVIS's runner


def run_script(script, tmp_path, *options):
    out = tmp_path / "out"
    before = set(out.glob("*")) if out.exists() else set()
    command = [sys.executable, "-W", "ignore", str(REPO / script), "--cfg-path", str(REPO / "projects/video/tiny/caption.yaml"),
               "--options", f"run.output_dir={out}", *options]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = set(out.glob("*")) - before
    return job, result.stderr + result.stdout


@pytest.mark.slow
def test_train_py_trains_and_evaluates_the_video_model_on_the_shapes_video_world(tmp_path, image_checkpoint):
    job, _ = run_script("train.py", tmp_path)
    checkpoint = load_checkpoint(job / "checkpoint_latest.pth")
    assert checkpoint["iters"] == 2
    temporal = [k for k in checkpoint["model"] if ".temporal_merge." in k]
    assert len(temporal) == 10 and {k.split(".")[0] for k in checkpoint["model"]} == CONNECTOR_PARTS | {"visual_encoder"}
    assert checkpoint["model"][next(k for k in temporal if k.endswith("alpha"))].item() != 0  # trained
    for split in ("val", "test"):
        metrics = json.loads((job / f"metrics_{split}.json").read_text())
        assert {"CIDEr", "Bleu_4", "scene_event_f1"} <= set(metrics)

    # The EVLGen-image row: an image checkpoint evaluated on the clips (video_mode image).
    job, log = run_script("evaluate.py", tmp_path, "model.video_mode=image", "model.load_finetuned=True",
                          f"model.finetuned={image_checkpoint}", "run.evaluate=True")
    assert "CIDEr" in json.loads((job / "metrics_test.json").read_text())


def train_loss(job: Path) -> float:
    """The last ``train_loss`` the runner wrote to ``job/log.txt``."""
    stats = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train_')]
    return float(stats[-1]["train_loss"])


@pytest.mark.slow
def test_the_opt_video_model_trains_with_scst_and_evaluates_through_the_scripts(tmp_path):
    opt = "model.arch=evlgen_video_opt"
    job, _ = run_script("train.py", tmp_path, opt)
    assert load_checkpoint(job / "checkpoint_latest.pth")["iters"] == 2
    refs = tmp_path / "refs.json"
    subprocess.run([sys.executable, "-m", "lavis_evlgen.models.scst", "--cfg-path", str(REPO / "projects/video/tiny/caption.yaml"),
                    "--out", str(refs)], cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), check=True, capture_output=True)
    scst_job, _ = run_script("train.py", tmp_path, opt, "model.scst=True", f"model.scst_references={refs}",
                             "model.load_pretrained=True", f"model.pretrained={job / 'checkpoint_best.pth'}")
    # The caption loss of a random tiny OPT is ~ln(vocabulary); SCST's is reward-weighted and near 0.
    assert train_loss(job) > 1 and abs(train_loss(scst_job)) < 1
    eval_job, _ = run_script("evaluate.py", tmp_path, opt, "model.load_finetuned=True",
                             f"model.finetuned={scst_job / 'checkpoint_best.pth'}", "run.evaluate=True")
    assert {"CIDEr", "scene_event_f1"} <= set(json.loads((eval_job / "metrics_test.json").read_text()))
