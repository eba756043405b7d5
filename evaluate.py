"""Evaluate a model on the test splits of a LAVIS config, as LAVIS's evaluate.py.

    python evaluate.py --cfg-path CONFIG.yaml [--options model.finetuned=/path/checkpoint.pth ...]
    python -m torch.distributed.run --nproc_per_node=N evaluate.py --cfg-path CONFIG.yaml

The model is evaluated with the weights its config loads (no reload of a best checkpoint), on
``run.test_splits``; only those splits are built.
"""
from train import build_runner


def main(argv=None):
    build_runner(argv, test_splits_only=True).evaluate(skip_reload=True)


if __name__ == "__main__":
    main()
