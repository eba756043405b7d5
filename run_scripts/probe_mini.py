"""Linear probes for colour, shape and count along the mini model's path (ViT layers -> soft prompts).

    python run_scripts/probe_mini.py [--checkpoint CKPT] [--model-type mini] [--options model.KEY=VALUE ...]
    python run_scripts/probe_mini.py --supervised-connector 300 [--options ...]

Without --checkpoint the trained parts are probed at initialisation. --supervised-connector N instead
trains the connector for N steps to the scene's colour/shape/pair sets (can it pass them when told
to?). See lavis_evlgen/experiments/probe.py.
"""
import argparse
from pathlib import Path

import lavis_evlgen  # noqa: F401  (first: registers the plugin, quiets LAVIS's import-time warnings)
import torch
from lavis.models import load_model_and_preprocess
from omegaconf import OmegaConf

from lavis_evlgen.datasets.shapes_world import ensure_shapes_world
from lavis_evlgen.experiments import report
from lavis_evlgen.experiments.probe import TARGETS, probe_model, supervised_connector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a main-job checkpoint_best.pth (default: untrained parts)")
    parser.add_argument("--model-type", default="mini")
    parser.add_argument("--options", nargs="*", default=[], help="model config overrides, e.g. model.vit_layer=8")
    parser.add_argument("--num-train", type=int, default=800, help="train images the probes are fitted on")
    parser.add_argument("--supervised-connector", type=int, metavar="STEPS",
                        help="train the connector STEPS steps (batch 16, lr 1e-4) to the scene sets; prints val F1")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, vis, _ = load_model_and_preprocess("evlgen_vicuna", args.model_type, is_eval=True)
    if args.options:
        cfg = OmegaConf.merge(OmegaConf.load(type(model).default_config_path(args.model_type)).model,
                              OmegaConf.from_dotlist(args.options).model)
        model = type(model).from_config(cfg).eval()
    if args.checkpoint:
        model.load_checkpoint(str(args.checkpoint))
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
