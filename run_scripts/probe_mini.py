"""Linear probes for colour, shape and count along the mini model's path (ViT layers -> soft prompts).

    python run_scripts/probe_mini.py [--checkpoint CKPT] [--model-type mini] [--options model.KEY=VALUE ...]

Without --checkpoint the trained parts are probed at initialisation. See lavis_evlgen/experiments/probe.py.
"""
import argparse
from pathlib import Path

import lavis_evlgen  # noqa: F401  (first: registers the plugin, quiets LAVIS's import-time warnings)
import torch
from lavis.models import load_model_and_preprocess
from omegaconf import OmegaConf

from lavis_evlgen.datasets.shapes_world import ensure_shapes_world
from lavis_evlgen.experiments import report
from lavis_evlgen.experiments.probe import TARGETS, probe_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a main-job checkpoint_best.pth (default: untrained parts)")
    parser.add_argument("--model-type", default="mini")
    parser.add_argument("--options", nargs="*", default=[], help="model config overrides, e.g. model.vit_layer=8")
    parser.add_argument("--num-train", type=int, default=800, help="train images the probes are fitted on")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, vis, _ = load_model_and_preprocess("evlgen_vicuna", args.model_type, is_eval=True)
    if args.options:
        cfg = OmegaConf.merge(OmegaConf.load(type(model).default_config_path(args.model_type)).model,
                              OmegaConf.from_dotlist(args.options).model)
        model = type(model).from_config(cfg).eval()
    if args.checkpoint:
        model.load_checkpoint(str(args.checkpoint))
    results = probe_model(model, vis["eval"], ensure_shapes_world(), num_train=args.num_train)
    rows = [[stage, *(f"{scores[t]:.1f}" for t in TARGETS)] for stage, scores in results.items()]
    print(report.markdown_table(["stage (val accuracy %)", *TARGETS], rows))


if __name__ == "__main__":
    main()
