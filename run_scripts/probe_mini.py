"""Linear probes for colour, shape and count along the mini model's path (ViT layers -> soft prompts).

    python run_scripts/probe_mini.py [--checkpoint CKPT] [--model-type mini] [--options model.KEY=VALUE ...]
    python run_scripts/probe_mini.py --supervised-connector 300 [--options ...]
    python run_scripts/probe_mini.py --text-ceiling [--options model.llm_model=...]

Without --checkpoint the trained parts are probed at initialisation. --supervised-connector N instead
trains the connector for N steps to the scene's colour/shape/pair sets (can it pass them when told
to?). --text-ceiling scores what the frozen LLM writes when the scene is given to it as text
(the most any soft prompt can tell it). See lavis_evlgen/experiments/probe.py.
"""
import argparse
from pathlib import Path

import lavis_evlgen  # noqa: F401  (first: registers the plugin, quiets LAVIS's import-time warnings)
import torch
from lavis.common.registry import registry
from lavis.models import load_preprocess
from omegaconf import OmegaConf

from lavis_evlgen.datasets.shapes_world import ensure_shapes_world
from lavis_evlgen.experiments import report
from lavis_evlgen.experiments.probe import TARGETS, probe_model, shape_copy_probability, supervised_connector, text_ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a main-job checkpoint_best.pth (default: untrained parts)")
    parser.add_argument("--model-type", default="mini")
    parser.add_argument("--options", nargs="*", default=[], help="model config overrides, e.g. model.vit_layer=8")
    parser.add_argument("--num-train", type=int, default=800, help="train images the probes are fitted on")
    parser.add_argument("--supervised-connector", type=int, metavar="STEPS",
                        help="train the connector STEPS steps (batch 16, lr 1e-4) to the scene sets; prints val F1")
    parser.add_argument("--text-ceiling", action="store_true",
                        help="caption val and test from the scene written as text (no image): the LLM's ceiling")
    args = parser.parse_args()
    torch.manual_seed(0)
    # The options apply before the model is built: the default parts they replace are never built.
    model_class = registry.get_model_class("evlgen_vicuna")
    config = OmegaConf.load(model_class.default_config_path(args.model_type))
    model = model_class.from_config(OmegaConf.merge(config.model, OmegaConf.from_dotlist(args.options).get("model", {}))).eval()
    vis, _ = load_preprocess(config.preprocess)
    if args.checkpoint:
        model.load_checkpoint(str(args.checkpoint))
    if args.text_ceiling:
        columns = ["count_acc", "color_f1", "shape_f1", "pair_f1", "held_out_recall", "unparseable", "repeated"]
        scores = {split: text_ceiling(model, ensure_shapes_world(), split, num_beams=5, max_new_tokens=30)
                  for split in ("val", "test")}
        rows = [[split, *(f"{s[c]:.1f}" if c in s else "—" for c in columns)] for split, s in scores.items()]
        print(report.markdown_table(["split", *columns], rows))
        copy = shape_copy_probability(model, ensure_shapes_world())
        print(f"P(right shape | \"... a <colour>\") over {copy['objects']} val objects: "
              f"{copy['with list']:.3f} with the scene list in context, {copy['without list']:.3f} without "
              f"(chance 0.25)")
        return
    if args.supervised_connector:
        rows = supervised_connector(model, vis["eval"], ensure_shapes_world(), steps=args.supervised_connector)
        columns = ["step", "loss", "colour F1", "shape F1", "pair F1"]
        print(report.markdown_table(columns, [[f"{row[c]:.3g}" if c == "loss" else f"{row[c]:.0f}" if c == "step"
                                               else f"{row[c]:.1f}" for c in columns] for row in rows]))
        return
    results = probe_model(model, vis["eval"], ensure_shapes_world(), num_train=args.num_train)
    rows = [[stage, *(f"{scores[t]:.1f}" for t in TARGETS)] for stage, scores in results.items()]
    print(report.markdown_table(["stage (val accuracy %)", *TARGETS], rows))


if __name__ == "__main__":
    main()
