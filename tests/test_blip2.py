"""BLIP-2 baselines at tiny size: stage 1 (ITC + ITM + ITG), stage 2 (OPT and LLaMA), stage 1 -> stage 2."""
import pytest
import torch
import torch.distributed as dist
from lavis.common.registry import registry
from lavis.models import load_model
from omegaconf import OmegaConf

import lavis_evlgen  # noqa: F401  (registers the models)
from lavis_evlgen.common.checkpoint import CheckpointMismatchError
from lavis_evlgen.models import BLIP2, BLIP2Config, BLIP2Stage1

from launch import free_port

STAGE2_ARCHS = ["blip2_baseline_opt", "blip2_baseline_vicuna"]


def batch(size=3):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(size, 3, 112, 112, generator=g),
        "text_input": ["a red circle on the left", "two blue squares", "a green star"][:size],
    }


@pytest.fixture
def process_group():
    """Stage 1 gathers negatives across processes (LAVIS's code): a gloo group of one process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    return load_model("blip2_baseline", "tiny")


@pytest.fixture(scope="module", params=STAGE2_ARCHS)
def stage2(request):
    torch.manual_seed(0)
    return load_model(request.param, "tiny")


def trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_losses_and_gradients(stage1, process_group):
    stage1.train()
    stage1.zero_grad()
    out = stage1(batch())
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.isfinite(out[name]) and out[name] > 0, name
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_lm)
    out.loss.backward()
    grads = trainable_grads(stage1)
    for prefix in ("ln_vision", "query_tokens", "vision_proj", "text_proj", "itm_head", "temp", "Qformer.bert.encoder"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    assert all(p.grad is None for p in stage1.visual_encoder.parameters())
    assert not stage1.visual_encoder.training


def test_stage1_query_branch_starts_as_the_text_branch(stage1):
    layer = stage1.Qformer.bert.encoder.layer[0]
    assert layer.intermediate_query.dense.weight is not layer.intermediate.dense.weight
    fresh = load_model("blip2_baseline", "tiny")
    fresh_layer = fresh.Qformer.bert.encoder.layer[0]
    torch.testing.assert_close(fresh_layer.intermediate_query.dense.weight, fresh_layer.intermediate.dense.weight)
    torch.testing.assert_close(fresh_layer.output_query.dense.weight, fresh_layer.output.dense.weight)


def test_stage1_generates_captions_with_beams(stage1):
    stage1.eval()
    captions = stage1.generate(batch(2), num_beams=3, max_length=8, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_stage1_without_process_group_is_a_clear_error():
    model = BLIP2Stage1.from_config(load_tiny_config("blip2_baseline"))
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed.run"):
        model(batch())


def load_tiny_config(arch):
    return dict(OmegaConf.load(registry.get_model_class(arch).default_config_path("tiny")).model)


def test_stage2_forward_backward_generate(stage2):
    stage2.train()
    stage2.zero_grad()
    out = stage2(batch())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = {n.split(".")[0] for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable == {"ln_vision", "Qformer", "query_tokens", "llm_proj"}
    assert all(g is not None for g in trainable_grads(stage2).values())
    assert all(p.grad is None for p in stage2.llm.parameters())
    stage2.eval()
    prefix = stage2.encode_image(batch()["image"])
    assert prefix.shape == (3, stage2.config.num_query_token, stage2.llm.config.hidden_size)
    assert len(stage2.generate(batch(), num_beams=2, max_length=5)) == 3
    assert len(stage2.predict_answers({**batch(2), "text_input": ["what color?", "how many?"]}, max_len=3)) == 2


def test_stage2_keeps_only_the_query_branch(stage2):
    qformer = stage2.Qformer
    assert qformer.cls is None and qformer.bert.embeddings.word_embeddings is None
    assert all(layer.intermediate is None and layer.output is None for layer in qformer.bert.encoder.layer)


def stage1_checkpoint(model, path):
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k not in frozen}}, path)
    return path


@pytest.mark.parametrize("arch", STAGE2_ARCHS)
def test_stage1_checkpoint_loads_into_stage2(stage1, arch, tmp_path):
    with torch.no_grad():
        stage1.query_tokens.add_(1.0)  # differ from any fresh initialisation
    path = stage1_checkpoint(stage1, tmp_path / "stage1.pth")
    torch.manual_seed(0)
    one_stage = load_model(arch, "tiny")
    cfg = {**load_tiny_config(arch), "stage1_checkpoint": str(path)}
    torch.manual_seed(0)
    two_stage = type(one_stage).from_config(cfg)
    assert two_stage.config.stage1_checkpoint == str(path)
    torch.testing.assert_close(two_stage.query_tokens, stage1.query_tokens)
    torch.testing.assert_close(two_stage.ln_vision.weight, stage1.ln_vision.weight)
    for name, tensor in two_stage.Qformer.state_dict().items():
        torch.testing.assert_close(tensor, stage1.Qformer.state_dict()[name], msg=name)
    # llm_proj is new in stage 2: the same seeded initialisation as a one-stage model's
    torch.testing.assert_close(two_stage.llm_proj.weight, one_stage.llm_proj.weight)
    assert not torch.allclose(two_stage.query_tokens, one_stage.query_tokens)


def test_stage2_rejects_a_checkpoint_that_is_not_stage1(stage1, tmp_path):
    model = load_model("blip2_baseline_opt", "tiny")
    state = torch.load(stage1_checkpoint(stage1, tmp_path / "s1.pth"), weights_only=True)["model"]
    torch.save({"model": {**state, "connector.encoder.layer.0.weight": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointMismatchError, match="connector.encoder.layer.0.weight"):
        model.load_stage1(str(tmp_path / "foreign.pth"))
    torch.save({"model": {k: v for k, v in state.items() if k != "query_tokens"}}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match="query_tokens"):
        model.load_stage1(str(tmp_path / "partial.pth"))


def test_config_keys_are_checked():
    with pytest.raises(KeyError, match="num_query_tokens"):
        BLIP2Config.from_dict({"arch": "blip2_baseline_opt", "num_query_tokens": 8})
    assert issubclass(registry.get_model_class("blip2_baseline_vicuna"), BLIP2)
