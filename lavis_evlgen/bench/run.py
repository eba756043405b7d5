"""The benchmark run: every row on the same inputs, interleaved, and what it writes.

Timing: ``warmup`` + ``steps`` rounds; each round runs one training step of every row (the start
rotating each round), so background load hits all rows alike, and every per-row figure is the
median over the timed rounds. Ratios between rows are medians of per-round ratios (paired).
Then generation rounds (beam search, interleaved the same way), one step per row for peak memory,
and the connector MACs per sample.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step (weights included); on CPU
the peak of torch's CPU tensor bytes allocated during one step above what was live before it
(torch profiler memory events; weights and optimizer state excluded).
"""
import dataclasses
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lavis_evlgen.bench.connectors import paper_connector_calls
from lavis_evlgen.bench.macs import connector_macs, linear_macs
from lavis_evlgen.bench.variants import BENCHES, SIZES, VARIANTS, VariantBench, build_model, make_batch
from lavis_evlgen.experiments.report import machine, markdown_table

# The paper's connector MACs per sample (G), the targets: within 1% for EVLGen and stage 2.
PAPER_MACS_G = {"evlgen": 11.9, "blip2_stage2": 6.28, "blip2_stage1": 36.7}
MACS_TOLERANCE = 0.01
MATCHING_SHARE_TARGET = 0.05
STEP_RATIO_TARGET = 1.05
# How far above 1 - (ViT share) the cached row's step ratio may be (machine noise, cache reads).
CACHE_RATIO_SLACK = 0.05
# Half depth at the paper's size: 6 layers from 257 to 29 tokens. A constant r=38 ends at 34 (ToMe
# caps a layer at (T - 1) // 2 merges: 67 tokens allow 33), so the last layer takes the rest.
PAPER_HALF_DEPTH_R = [40, 40, 40, 40, 40, 28]


@dataclass
class BenchConfig:
    """Every option of a benchmark run, with its default (the committed mini run's)."""

    size: str = "mini"  # tiny | mini: timing and MACs of built models; paper: MACs only
    variants: list = field(default_factory=lambda: list(VARIANTS))
    batch_size: int = 16  # the mini comparison's batch per process
    warmup: int = 1
    steps: int = 6
    gen_rounds: int = 3
    beams: int = 5
    gen_tokens: int = 20
    lr: float = 1e-5
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present
    out: str = "output/bench"

    def __post_init__(self):
        if self.size not in (*SIZES, "paper"):
            raise ValueError(f"bench: size={self.size!r} is not one of {(*SIZES, 'paper')}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"bench: unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
        if self.steps < 1 or self.warmup < 0 or self.gen_rounds < 0:
            raise ValueError(f"bench: steps >= 1, warmup >= 0, gen_rounds >= 0; got {self.steps}, {self.warmup}, "
                             f"{self.gen_rounds}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ensure_process_group() -> None:
    """BLIP-2 stage 1 (LAVIS's code) gathers negatives across processes: a gloo group of one."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)


def rounds(benches: list[VariantBench], count: int, measure, what: str) -> list[list]:
    """``count`` rounds of ``measure(bench)`` over every bench, the start rotating each round.

    Returns one list per round, in ``benches`` order. Logs each round (``what``: what is measured).
    """
    results, started = [], time.time()
    for i in range(count):
        logging.info("bench: %s round %d/%d, %.0f s so far", what, i + 1, count, time.time() - started)
        order = [(i + k) % len(benches) for k in range(len(benches))]
        out = [None] * len(benches)
        for k in order:
            out[k] = measure(benches[k])
        results.append(out)
    return results


def peak_memory_mb(bench: VariantBench) -> tuple[float, str]:
    """(MB, how) over one training step of ``bench`` (see the module docstring)."""
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
        bench.step()
        return torch.cuda.max_memory_allocated(bench.device) / 2**20, "cuda max_memory_allocated (incl. weights)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:  # +bytes on allocation, -bytes on free
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20, "cpu: torch profiler, peak tensor bytes allocated during the step"


def run_bench(config: BenchConfig) -> dict:
    """Time, measure and count every variant at ``config.size`` (tiny or mini). Returns bench.json's content."""
    device = resolve_device(config.device)
    ensure_process_group()
    torch.manual_seed(config.seed)
    benches = []
    for name in config.variants:
        variant = VARIANTS[name]
        model = build_model(variant, config.size, device)
        batch = make_batch(config.batch_size, model.config.image_size, device, config.seed)
        benches.append(BENCHES[variant.bench](variant, model, batch, config.lr))

    started, load_before = time.time(), os.getloadavg()
    steps = rounds(benches, config.warmup + config.steps, lambda b: {**b.step(), "matching_s": b.matching_s()},
                   "training step")
    steps = steps[config.warmup:]
    gen = rounds(benches, config.gen_rounds, lambda b: b.generate(config.beams, config.gen_tokens), "generation")

    rows = []
    for k, bench in enumerate(benches):
        model, per_round = bench.model, [r[k] for r in steps]
        median = {key: statistics.median(r[key] for r in per_round)
                  for key in ("step_s", "vit_s", "connector_s", "llm_s", "optimizer_s")}
        matching = [r["matching_s"] for r in per_round if r["matching_s"] is not None]
        gen_s = [r[k] for r in gen if r[k] is not None]
        memory, memory_kind = peak_memory_mb(bench)
        macs = connector_macs(bench.connector_call())
        rows.append({
            "name": bench.variant.name, "label": bench.variant.label, "arch": bench.variant.arch,
            "overrides": bench.variant.overrides.get(config.size, {}),
            **median,
            "step_s_rounds": [r["step_s"] for r in per_round],
            "samples_per_s": config.batch_size / median["step_s"],
            "loss": per_round[-1]["loss"],
            "matching_s": statistics.median(matching) if matching else None,
            "matching_share": (statistics.median(m / r["connector_s"] for m, r in zip(matching, per_round))
                               if matching else None),
            "captions_per_s": config.batch_size / statistics.median(gen_s) if gen_s else None,
            "peak_mem_mb": memory, "peak_mem_kind": memory_kind,
            "connector_macs_linear": macs["linear"], "connector_macs_total": macs["total"],
            "soft_prompts": _soft_prompt_count(bench),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        })
    return {"size": config.size, "device": str(device), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "config": dataclasses.asdict(config), "measure_s": time.time() - started,
            # The machine's 1-minute load average before and after the measurement: other jobs share it.
            "load_avg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)], "rows": rows,
            "targets": timing_targets(rows)}


def _soft_prompt_count(bench: VariantBench) -> int | None:
    """Soft prompts the LLM gets (None for stage 1, which has no LLM)."""
    if bench.variant.bench == "stage1":
        return None
    with torch.no_grad():
        return bench.model.encode_image(bench.batch["image"][:1]).shape[1]


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of row a's step time / row b's (same round: same machine load)."""
    return statistics.median(x / y for x, y in zip(a["step_s_rounds"], b["step_s_rounds"]))


def timing_targets(rows: list[dict]) -> list[dict]:
    """The issue's timing targets as measured ratios: {"target", "value", "limit", "met"}."""
    by_name = {r["name"]: r for r in rows}
    targets = []
    for name in ("evlgen", "evlgen_half"):
        row = by_name.get(name)
        if row and row["matching_share"] is not None:
            targets.append({"target": f"{name}: matching + merging / connector fwd+bwd time",
                            "value": row["matching_share"], "limit": f"< {MATCHING_SHARE_TARGET}",
                            "met": row["matching_share"] < MATCHING_SHARE_TARGET})
        if row and "blip2_stage2" in by_name:
            ratio = paired_ratio(row, by_name["blip2_stage2"])
            targets.append({"target": f"{name} step time / blip2_stage2 step time (median of per-round ratios)",
                            "value": ratio,
                            "limit": f"<= {STEP_RATIO_TARGET}", "met": ratio <= STEP_RATIO_TARGET})
    if "evlgen" in by_name and "evlgen_cached" in by_name:
        full, cached = by_name["evlgen"], by_name["evlgen_cached"]
        # Reading the cache saves the ViT forward and nothing else: the step should shrink by the ViT's share.
        expected = 1 - full["vit_s"] / full["step_s"]
        ratio = paired_ratio(cached, full)
        targets.append({"target": "evlgen_cached step time / evlgen step time (expected: 1 - ViT share)",
                        "value": ratio, "limit": f"<= {expected:.3f} + {CACHE_RATIO_SLACK}",
                        "met": ratio <= expected + CACHE_RATIO_SLACK})
    return targets


def paper_macs() -> dict:
    """Connector MACs per sample at the paper's sizes (random weights, CPU), against the paper's figures.

    Also what the stage-1 count depends on: the ITG language-model head's share, and the MACs per
    text token (measured from stage 1 at 32 and 16 text tokens), hence the text length the paper's
    36.7G would correspond to.
    """
    ensure_process_group()
    torch.manual_seed(0)
    calls = paper_connector_calls(PAPER_HALF_DEPTH_R)
    rows = []
    for name, call in calls.items():
        macs = connector_macs(call)
        paper = PAPER_MACS_G.get(name)
        rows.append({"name": name, "connector_macs_linear": macs["linear"], "connector_macs_total": macs["total"],
                     "paper_g": paper, "linear_vs_paper": macs["linear"] / (paper * 1e9) if paper else None})

    stage1 = calls["blip2_stage1"]
    lm_head = linear_macs(stage1.scope.Qformer.cls, stage1.run) / stage1.batch
    full = next(r["connector_macs_linear"] for r in rows if r["name"] == "blip2_stage1")
    stage1.scope.max_txt_len = 16
    short = linear_macs(stage1.scope, stage1.run) / stage1.batch
    short_head = linear_macs(stage1.scope.Qformer.cls, stage1.run) / stage1.batch
    stage1.scope.max_txt_len = 32
    per_token = (full - short) / 16
    per_token_no_head = (full - lm_head - (short - short_head)) / 16
    paper = PAPER_MACS_G["blip2_stage1"] * 1e9
    # The text runs through 5 Q-Former passes (ITC text, 3 ITM pairs, ITG): one pass of 32 text tokens.
    text_pass = per_token_no_head * 32 / 5
    stage1_analysis = {
        "text_tokens": 32, "linear": full, "itg_lm_head": lm_head, "linear_without_lm_head": full - lm_head,
        "per_text_token": per_token, "per_text_token_without_lm_head": per_token_no_head,
        "text_tokens_for_paper": 32 - (full - paper) / per_token,
        "text_tokens_for_paper_without_lm_head": 32 - (full - lm_head - paper) / per_token_no_head,
        "one_text_pass": text_pass, "linear_without_one_text_pass": full - text_pass,
    }
    targets = [{"target": f"{r['name']}: Linear-only MACs / paper's {r['paper_g']}G", "value": r["linear_vs_paper"],
                "limit": f"within {MACS_TOLERANCE:.0%}", "met": abs(r["linear_vs_paper"] - 1) <= MACS_TOLERANCE}
               for r in rows if r["name"] in ("evlgen", "blip2_stage2")]
    return {"size": "paper", "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "half_depth_r": PAPER_HALF_DEPTH_R, "rows": rows, "stage1": stage1_analysis, "targets": targets}


# ---------------------------------------------------------------- writing
def _g(macs: float | None) -> str:
    return "—" if macs is None else f"{macs / 1e9:.3f}G" if macs >= 1e8 else f"{macs / 1e6:.2f}M"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def bench_table(result: dict) -> str:
    """The timing table of a tiny/mini run (medians over rounds)."""
    header = ["row", "step s", "ViT fwd s", "connector fwd+bwd s", "LLM fwd+bwd s", "optimizer s", "samples/s",
              "captions/s (beam 5)", "peak MB", "soft prompts", "trainable", "connector MACs, Linear",
              "connector MACs, all", "matching share"]
    rows = [[r["label"], f"{r['step_s']:.3f}", f"{r['vit_s']:.3f}", f"{r['connector_s']:.3f}", f"{r['llm_s']:.3f}",
             f"{r['optimizer_s']:.3f}", f"{r['samples_per_s']:.1f}", _num(r["captions_per_s"], ".1f"),
             f"{r['peak_mem_mb']:.0f}", _num(r["soft_prompts"], "d"), f"{r['trainable_params'] / 1e6:.1f}M",
             _g(r["connector_macs_linear"]), _g(r["connector_macs_total"]),
             "—" if r["matching_share"] is None else f"{r['matching_share']:.1%}"] for r in result["rows"]]
    return markdown_table(header, rows)


def macs_table(result: dict) -> str:
    """The paper-size MACs table."""
    rows = [[r["name"], _g(r["connector_macs_linear"]), _g(r["connector_macs_total"]),
             "—" if r["paper_g"] is None else f"{r['paper_g']}G",
             "—" if r["linear_vs_paper"] is None else f"{r['linear_vs_paper']:.4f}"] for r in result["rows"]]
    return markdown_table(["row", "connector MACs, Linear", "connector MACs, all", "paper", "Linear / paper"], rows)


def stage1_text(result: dict) -> str:
    s = result["stage1"]
    return (f"Stage 1 with {s['text_tokens']} text tokens: {_g(s['linear'])} Linear MACs, of which the ITG "
            f"language-model head (768 -> 30,523 words per text token) is {_g(s['itg_lm_head'])}; without it "
            f"{_g(s['linear_without_lm_head'])}. Each text token costs {_g(s['per_text_token'])} "
            f"({_g(s['per_text_token_without_lm_head'])} without the head: it runs through 5 Q-Former passes, ITC "
            f"text, 3 ITM pairs, ITG). The paper's 36.7G is {s['text_tokens_for_paper']:.1f} text tokens with the "
            f"head, {s['text_tokens_for_paper_without_lm_head']:.1f} without; or the count with the head less one "
            f"32-token text pass ({_g(s['one_text_pass'])}): {_g(s['linear_without_one_text_pass'])}.")


def targets_text(targets: list[dict]) -> str:
    return "\n".join(f"- {t['target']}: {t['value']:.4f} (target {t['limit']}): {'met' if t['met'] else 'MISSED'}"
                     for t in targets)


def write_outputs(result: dict, out: Path, command: str) -> None:
    """bench.json and bench.md (tiny/mini) or macs.json and macs.md (paper) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, **result}
    stem = "macs" if result["size"] == "paper" else "bench"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if stem == "macs":
        body = f"{macs_table(result)}\n\n{stage1_text(result)}\n"
    else:
        load = result["load_avg"]
        body = (f"{bench_table(result)}\n\nMedians over {result['config']['steps']} interleaved rounds after "
                f"{result['config']['warmup']} warm-up, batch {result['config']['batch_size']}; measured in "
                f"{result['measure_s']:.0f} s on {result['device']}, machine load average {load[0]} before, "
                f"{load[1]} after (shared with other jobs). Peak memory: {result['rows'][0]['peak_mem_kind']}.\n")
    text = (f"# Benchmark, {result['size']} size\n\n```\n$ {command}\n```\n\n{result['machine']}; {result['date']}.\n\n"
            f"{body}\nTargets:\n\n{targets_text(result['targets'])}\n")
    (out / f"{stem}.md").write_text(text)
