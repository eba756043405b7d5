"""The benchmark command at tiny size: it runs, writes its outputs with the schema, and what it
times and counts is the model's own computation."""
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import BertConfig

import lavis_evlgen  # noqa: F401  (registers the models)
from lavis_evlgen.bench.__main__ import main
from lavis_evlgen.bench.macs import linear_macs, total_macs
from lavis_evlgen.bench.variants import BENCHES, VARIANTS, build_model, make_batch
from lavis_evlgen.models.tomeformer import TomeFormer

from launch import free_port

ROW_NAMES = {"evlgen", "evlgen_half", "evlgen_cached", "blip2_stage1", "blip2_stage2"}


@pytest.fixture
def process_group():
    """Stage 1 gathers negatives across processes (LAVIS's code): a gloo group of one process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bench_command_writes_rows_with_the_schema(process_group, tmp_path):
    main(["--size", "tiny", "--batch-size", "2", "--warmup", "0", "--steps", "2", "--gen-rounds", "1",
          "--gen-tokens", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["command"].startswith("python -m lavis_evlgen.bench --size tiny")
    assert {r["name"] for r in result["rows"]} == ROW_NAMES
    for row in result["rows"]:
        assert row["step_s"] > 0 and len(row["step_s_rounds"]) == 2
        # The parts are laps of the same clock as the step: they cannot add up to more.
        parts = row["vit_s"] + row["connector_s"] + row["llm_s"] + row["optimizer_s"]
        assert parts <= row["step_s"] * 1.001
        assert row["connector_macs_total"] >= row["connector_macs_linear"] > 0
        assert row["peak_mem_mb"] > 0
        assert (row["captions_per_s"] is None) == (row["name"] == "blip2_stage1")
        assert (row["matching_share"] is not None) == row["name"].startswith("evlgen")
    names = {t["target"].split(":")[0].split(" ")[0] for t in result["targets"]}
    assert names == {"evlgen", "evlgen_half", "evlgen_cached"}
    cached = {r["name"]: r for r in result["rows"]}["evlgen_cached"]
    assert cached["vit_s"] < cached["step_s"] / 10  # the ViT does not run
    table = (tmp_path / "bench.md").read_text()
    assert "| EVLGen, half depth |" in table and "Targets:" in table


@pytest.mark.parametrize("name", ["evlgen", "evlgen_cached", "blip2_stage2"])
def test_timed_step_computes_the_models_loss(name):
    variant = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(variant, "tiny", torch.device("cpu")).eval()  # eval: no dropout, so losses compare
    batch = make_batch(2, model.config.image_size, torch.device("cpu"))
    with torch.no_grad():
        expected = model(batch)["loss"].item()
    bench = BENCHES[variant.bench](variant, model, batch)
    assert bench.step()["loss"] == pytest.approx(expected, rel=1e-5)


def test_linear_macs_counts_every_call_of_every_linear():
    layer = nn.Linear(8, 16)
    scope = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(3, 5, 8)
    assert linear_macs(scope, lambda: (scope(x), layer(x[:1]))) == 3 * 5 * 8 * 16 + 5 * 8 * 16
    assert total_macs(lambda: scope(x)) == 3 * 5 * 8 * 16


def test_tomeformer_linear_macs_follow_the_token_counts():
    """Attention projections (4 C^2) run on each layer's input tokens, the FFN (2 C I) on its merged tokens."""
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    tomeformer = TomeFormer.from_bert_config(config, tome_r=[20, 10, 5]).eval()
    counts = tomeformer.token_counts(65)
    expected = sum(4 * 32 * 32 * t_in + 2 * 32 * 64 * t_out for t_in, t_out in zip(counts[:-1], counts[1:]))
    x = torch.randn(2, 65, 32)
    assert linear_macs(tomeformer, lambda: tomeformer(x)) == 2 * expected
    # All ops add the attention products (QK^T and attention x V: 2 T^2 C per layer, CPU kernel
    # included) and the matching scores (set A x set B over the 8-dim per-head keys).
    attention = sum(2 * t * t * 32 for t in counts[:-1])
    matching = sum((t + 1) // 2 * (t // 2) * 8 for t in counts[:-1])
    assert total_macs(lambda: tomeformer(x)) == 2 * (expected + attention + matching)
