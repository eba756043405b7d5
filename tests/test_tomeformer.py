"""TomeFormer: BERT layers with token merging between attention and feed-forward."""

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from lavis_evlgen.models.merge import bipartite_soft_matching, merge_source
from lavis_evlgen.models.tomeformer import TomeFormer

PAPER_COUNTS = list(range(257, 28, -19))  # 257, 238, ..., 48, 29 (method.md section 2)


def tiny_config(num_layers=2, hidden=32, **kwargs):
    return BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=300,
        **kwargs,
    )


def embeds(b=2, t=257, c=32, seed=0):
    return torch.randn(b, t, c, generator=torch.Generator().manual_seed(seed))


def test_paper_schedule_shapes_and_counts():
    model = TomeFormer.from_bert_config(tiny_config(num_layers=12), tome_r=19).eval()
    assert model.token_counts(257) == PAPER_COUNTS
    assert model.output_token_count(257) == 29
    with torch.no_grad():
        out = model(embeds())
    assert out.last_hidden_state.shape == (2, 29, 32)
    assert out.size.shape == (2, 29, 1)
    assert torch.equal(out.size.sum(1), torch.full((2, 1), 257.0))
    assert out.source is None


def test_gradients_reach_every_parameter():
    model = TomeFormer.from_bert_config(tiny_config(num_layers=4), tome_r=9).train()
    x = embeds(t=65).requires_grad_(True)
    out = model(x).last_hidden_state
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient for {no_grad}"
    assert x.grad.abs().sum() > 0


def test_r0_matches_hf_bert():
    bert = BertModel(tiny_config(num_layers=3), add_pooling_layer=False).eval()
    model = TomeFormer(copy.deepcopy(bert), tome_r=0).eval()
    x = embeds(t=50)
    with torch.no_grad():
        expected = bert(inputs_embeds=x).last_hidden_state
        out = model(x)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.size, torch.ones(2, 50, 1))


def test_weighted_prop_attn_tracks_sizes_and_changes_attention():
    bert = BertModel(tiny_config(num_layers=3), add_pooling_layer=False)
    weighted = TomeFormer(copy.deepcopy(bert), tome_r=8, merge_mode="weighted").eval()
    prop = TomeFormer(copy.deepcopy(bert), tome_r=8, merge_mode="weighted", prop_attn=True).eval()
    x = embeds(t=41)
    with torch.no_grad():
        out_w, out_p = weighted(x), prop(x)
    assert out_p.last_hidden_state.shape == (2, 41 - 24, 32)
    assert torch.equal(out_p.size.sum(1), torch.full((2, 1), 41.0))
    assert out_p.size.max() > 1
    # Sizes are all one in the first layer, so proportional attention only acts from layer 2 on.
    assert not torch.allclose(out_w.last_hidden_state, out_p.last_hidden_state)


@pytest.mark.parametrize("num_layers, same", [(1, True), (3, False)])
def test_weighted_equals_mean_only_while_sizes_are_one(num_layers, same):
    bert = BertModel(tiny_config(num_layers=num_layers), add_pooling_layer=False)
    mean = TomeFormer(copy.deepcopy(bert), tome_r=8, merge_mode="mean").eval()
    weighted = TomeFormer(copy.deepcopy(bert), tome_r=8, merge_mode="weighted").eval()
    x = embeds(t=41)
    with torch.no_grad():
        out_m, out_w = mean(x), weighted(x)
    # In layer 1 every token has size 1, so the size-weighted mean is the plain mean.
    assert torch.allclose(out_m.last_hidden_state, out_w.last_hidden_state, atol=1e-6) == same


def test_trace_source_partitions_inputs():
    model = TomeFormer.from_bert_config(tiny_config(num_layers=3), tome_r=10, trace_source=True).eval()
    with torch.no_grad():
        out = model(embeds(t=61))
    assert out.source.shape == (2, 31, 61)
    assert torch.equal(out.source.sum(1), torch.ones(2, 61))
    torch.testing.assert_close(out.source.sum(-1, keepdim=True), out.size)
    assert torch.equal(out.source[:, 0], torch.eye(61)[0].expand(2, 61))  # CLS stays alone and first


def test_from_pretrained_keeps_first_layers(tmp_path, caplog):
    bert = BertModel(tiny_config(num_layers=4))
    bert.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="lavis_evlgen.models.tomeformer"):
        model = TomeFormer.from_pretrained(str(tmp_path), num_layers=2, tome_r=3)
    assert model.num_layers == 2 and model.config.num_hidden_layers == 2
    assert "kept 2 of 4 layers" in caplog.text
    unused = ("pooler.", "encoder.layer.2.", "encoder.layer.3.", "embeddings.word_embeddings.")
    expected = {k: v for k, v in bert.state_dict().items() if not k.startswith(unused)}
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_from_pretrained_rejects_missing_weights(tmp_path):
    BertModel(tiny_config(num_layers=2)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layer.1.output.dense.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        TomeFormer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("num_layers", [5, 0])
def test_num_layers_out_of_range(tmp_path, num_layers):
    BertModel(tiny_config(num_layers=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"num_layers={num_layers}.*\[1, 4\]"):
        TomeFormer.from_pretrained(str(tmp_path), num_layers=num_layers)
    with pytest.raises(ValueError, match=rf"num_layers={num_layers}"):
        TomeFormer.from_bert_config(tiny_config(num_layers=4), num_layers=num_layers)


def test_attention_mask_all_ones_or_error():
    model = TomeFormer.from_bert_config(tiny_config(), tome_r=4).eval()
    x = embeds(t=20)
    mask = torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask).last_hidden_state, model(x).last_hidden_state)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="padding"):
        model(x, mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"merge_mode": "avg"}, r"'avg'.*\('mean', 'weighted'\)"),
        ({"merge_mode": "mean", "prop_attn": True}, "weighted"),
        ({"tome_r": [3, 3, 3]}, "3 entries.*2"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TomeFormer.from_bert_config(tiny_config(), **kwargs)


def test_bad_inputs_raise():
    model = TomeFormer.from_bert_config(tiny_config(), tome_r=4)
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        model(torch.randn(2, 10, 16))
    with pytest.raises(ValueError, match="max_position_embeddings=300"):
        model(torch.randn(1, 301, 32))


def test_word_embeddings_dropped_and_repr():
    model = TomeFormer.from_bert_config(tiny_config(), tome_r=(4, -1.0), merge_mode="weighted")
    assert not any("word_embeddings" in k for k in model.state_dict())
    assert model.hidden_size == 32
    assert "r=[8, 0], merge_mode=weighted" in model.extra_repr()


def test_merge_metric_is_keys_averaged_over_heads():
    model = TomeFormer.from_bert_config(tiny_config(num_layers=1), tome_r=12, trace_source=True).eval()
    x = embeds(t=33)
    attn = model.encoder.layer[0].attention.self
    with torch.no_grad():
        source = model(x).source
        keys = attn.key(model.embeddings(inputs_embeds=x)).view(2, 33, attn.num_attention_heads, -1)
        merge, _ = bipartite_soft_matching(keys.mean(2), r=12)
    assert torch.equal(source, merge_source(merge, x))


def test_prop_attn_equals_attention_over_duplicated_tokens():
    # log(size) in the logits makes a token of size s count as s identical keys (ToMe, section 3).
    model = TomeFormer.from_bert_config(tiny_config(num_layers=1), tome_r=0).eval()
    layer = model.encoder.layer[0]
    x = embeds(b=1, t=6)
    size = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0, 4.0]).view(1, 6, 1)
    repeats = size.view(-1).long()
    with torch.no_grad():
        merged, _ = model._self_attention(layer, x, size)
        duplicated, _ = model._self_attention(layer, x.repeat_interleave(repeats, dim=1), None)
    first_copy = torch.cumsum(repeats, 0) - repeats
    torch.testing.assert_close(merged, duplicated[:, first_copy])
