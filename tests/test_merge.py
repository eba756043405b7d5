"""Token Merging math: bipartite soft matching, merge rules, source tracking, r schedules."""

import pytest
import torch

from lavis_evlgen.models.merge import (
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
    merged_token_counts,
    parse_r,
)

PAPER_COUNTS = list(range(257, 28, -19))  # 257, 238, ..., 48, 29 (method.md section 2)


def _inputs(b=2, t=17, c=8, ck=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, c, generator=g), torch.randn(b, t, ck, generator=g)


def _groups(source):
    """Member masks [T0] of every output token, per batch element."""
    return [[row.bool() for row in source[bi]] for bi in range(source.shape[0])]


def test_merge_removes_r_tokens_and_keeps_cls_first():
    x, metric = _inputs()
    merge, _ = bipartite_soft_matching(metric, r=5)
    out = merge(x)
    assert out.shape == (2, 12, 8)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
    source = merge_source(merge, x)
    assert torch.equal(source[:, 0], torch.eye(17)[0].expand(2, 17))  # CLS holds only itself


def test_mean_merge_is_plain_group_mean():
    x, metric = _inputs(t=33)
    merge, _ = bipartite_soft_matching(metric, r=16)
    out, source = merge(x, mode="mean"), merge_source(merge, x)
    assert source.sum(-1).max() > 2, "want a group of 3+ tokens so the mean is tested beyond pairs"
    for bi, groups in enumerate(_groups(source)):
        for j, members in enumerate(groups):
            torch.testing.assert_close(out[bi, j], x[bi, members].mean(0))


def test_sum_merge_adds_group_members():
    x, metric = _inputs()
    merge, _ = bipartite_soft_matching(metric, r=6)
    out, source = merge(x, mode="sum"), merge_source(merge, x)
    torch.testing.assert_close(out, source @ x)


def test_weighted_merge_is_size_weighted_mean():
    x, metric = _inputs(t=33)
    size = torch.randint(1, 5, (2, 33, 1)).float()
    merge, _ = bipartite_soft_matching(metric, r=16)
    out, new_size = merge_wavg(merge, x, size)
    source = merge_source(merge, x)
    for bi, groups in enumerate(_groups(source)):
        for j, members in enumerate(groups):
            w = size[bi, members]
            torch.testing.assert_close(out[bi, j], (w * x[bi, members]).sum(0) / w.sum())
            torch.testing.assert_close(new_size[bi, j], w.sum(0))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))


def test_weighted_merge_default_sizes_sum_to_t():
    x, metric = _inputs(t=20)
    merge, _ = bipartite_soft_matching(metric, r=7)
    _, size = merge_wavg(merge, x)
    assert size.shape == (2, 13, 1)
    assert torch.equal(size.sum(1), torch.full((2, 1), 20.0))


@pytest.mark.parametrize(
    "class_token, distill_token, expected", [(True, False, 18 - 8), (False, False, 18 - 9), (True, True, 18 - 8)]
)
def test_r_is_capped_at_half_of_unprotected_tokens(class_token, distill_token, expected):
    x, metric = _inputs(t=18)
    merge, _ = bipartite_soft_matching(metric, r=100, class_token=class_token, distill_token=distill_token)
    assert merge(x).shape[1] == expected


@pytest.mark.parametrize("r", [0, -3])
def test_non_positive_r_is_identity(r):
    x, metric = _inputs()
    merge, unmerge = bipartite_soft_matching(metric, r=r)
    assert merge(x) is x and unmerge(x) is x


@pytest.mark.parametrize("distill_token", [False, True])
def test_unmerge_puts_group_values_back_at_every_source_position(distill_token):
    x, metric = _inputs(t=21)
    merge, unmerge = bipartite_soft_matching(metric, r=7, distill_token=distill_token)
    merged = merge(x)
    restored = unmerge(merged)
    assert restored.shape == x.shape
    source = merge_source(merge, x)
    # Every input position belongs to exactly one group, so source^T @ merged is its group's value.
    torch.testing.assert_close(restored, source.transpose(1, 2) @ merged)


def test_distill_token_stays_second_and_unmerged():
    x, metric = _inputs(t=21)
    merge, _ = bipartite_soft_matching(metric, r=9, distill_token=True)
    out = merge(x)
    torch.testing.assert_close(out[:, :2], x[:, :2], rtol=0, atol=0)
    assert torch.equal(merge_source(merge, x)[:, 1].sum(-1), torch.ones(2))


def test_sources_partition_inputs_across_layers():
    x, metric = _inputs(t=40)
    size = source = None
    for r in (9, 7, 5):
        merge, _ = bipartite_soft_matching(metric, r=r)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
        metric = torch.randn(2, x.shape[1], 6)
    assert source.shape == (2, 40 - 21, 40)
    assert torch.equal(source.sum(1), torch.ones(2, 40))  # each input token in exactly one output
    torch.testing.assert_close(source.sum(-1, keepdim=True), size)  # row sums are the sizes


@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_flow_to_x_but_not_to_metric(weighted):
    x, metric = _inputs()
    x.requires_grad_(True)
    metric.requires_grad_(True)
    merge, _ = bipartite_soft_matching(metric, r=6)
    out = merge_wavg(merge, x)[0] if weighted else merge(x)
    out.sum().backward()
    assert (x.grad > 0).all()  # every token contributes a positive share to its group's output
    assert metric.grad is None


def test_merge_rejects_unknown_mode():
    x, metric = _inputs()
    merge, _ = bipartite_soft_matching(metric, r=3)
    with pytest.raises(ValueError, match="'median'"):
        merge(x, mode="median")


def test_distill_token_needs_class_token():
    _, metric = _inputs()
    with pytest.raises(ValueError, match="class_token"):
        bipartite_soft_matching(metric, r=3, class_token=False, distill_token=True)


def test_parse_r_constant_and_list():
    assert parse_r(12, 19) == [19] * 12
    assert parse_r(12, (19, 0.0)) == [19] * 12
    assert parse_r(3, [4, 0, 2]) == [4, 0, 2]
    assert parse_r(1, 7) == [7]


@pytest.mark.parametrize("inflect", [-1.0, -0.5, 0.5, 1.0])
def test_parse_r_inflection_schedules(inflect):
    schedule = parse_r(12, (10, inflect))
    steps = [b - a for a, b in zip(schedule, schedule[1:])]
    assert all(s <= 0 for s in steps) if inflect < 0 else all(s >= 0 for s in steps)
    assert schedule[0] != schedule[-1]
    assert abs(sum(schedule) - 10 * 12) <= 12  # int() truncation loses < 1 per layer
    if inflect == -1.0:
        assert (schedule[0], schedule[-1]) == (20, 0)


@pytest.mark.parametrize(
    "r, error, match",
    [
        ([19] * 11, ValueError, "11 entries.*12"),
        ((19, 1.5), ValueError, "inflection"),
        ((19, 0.0, 1), ValueError, r"\(r, inflection\)"),
        (-1, ValueError, ">= 0"),
        ([19] * 11 + [-2], ValueError, ">= 0"),
        (19.0, TypeError, "ints"),
        ("19", TypeError, "ints"),
        (True, TypeError, "ints"),
    ],
)
def test_parse_r_rejects_bad_settings(r, error, match):
    with pytest.raises(error, match=match):
        parse_r(12, r)


def test_merged_token_counts_paper_schedule():
    assert merged_token_counts(257, [19] * 12) == PAPER_COUNTS


@pytest.mark.parametrize("num_tokens, schedule", [(257, [19] * 12), (30, [100, 3, 0, 100, 5]), (9, [4, 4, 4])])
def test_merged_token_counts_match_running_the_matching(num_tokens, schedule):
    x, _ = _inputs(b=1, t=num_tokens)
    counts = [num_tokens]
    for r in schedule:
        merge, _ = bipartite_soft_matching(torch.randn(1, x.shape[1], 6), r=r)
        x = merge(x)
        counts.append(x.shape[1])
    assert merged_token_counts(num_tokens, schedule) == counts
