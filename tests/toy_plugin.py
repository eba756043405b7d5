"""A tiny deterministic LAVIS model and dataset builder, to run the real runners end to end.

Importing registers the model ``evlgen_toy`` and the builder ``evlgen_toy_data``. Run as a
script, this file is ``train.py`` with the toy registered (what torchrun needs):

    python -m torch.distributed.run --nproc_per_node=2 tests/toy_plugin.py --cfg-path run.yaml
"""
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.models.base_model import BaseModel
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_DIM = 4
# Captions and answers by the sign of the target / of the model's output.
CAPTIONS = {True: ["a dog runs on the green grass", "a brown dog running in a park"],
            False: ["a cat sleeps on a red sofa", "a small cat asleep on a couch"]}
ANSWERS = {True: ["two"] * 8 + ["2", "three"], False: ["no"] * 9 + ["yes"]}


def _default_config(name: str, config: dict) -> str:
    """LAVIS reads a model's and a builder's defaults from a yaml file: the toy's go to the temp dir
    (written atomically: the processes of a torchrun job all write it)."""
    path = Path(tempfile.gettempdir()) / "evlgen_toy_plugin" / name
    text = yaml.safe_dump(config)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


@registry.register_model("evlgen_toy")
class ToyModel(BaseModel):
    """image [B, 4] -> frozen Linear(4, H) -> ReLU -> dropout -> trainable Linear(H, 1); MSE to label [B].
    The frozen layer has a buffer, to exercise checkpoints that omit frozen state; ``dropout``
    (default 0) draws from torch's generator in training."""

    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}  # built from project configs only

    def __init__(self, hidden_dim: int = 8, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.frozen = nn.Linear(IN_DIM, hidden_dim)
        self.head = nn.Linear(hidden_dim, 1)
        self.frozen.register_buffer("scale", torch.full((hidden_dim,), 0.5))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        self.frozen.requires_grad_(False)

    def score(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 4] -> [B]."""
        hidden = F.dropout(F.relu(self.frozen(image)) * self.frozen.scale, self.dropout, self.training)
        return self.head(hidden).squeeze(-1)

    def forward(self, samples: dict) -> dict:
        return {"loss": F.mse_loss(self.score(samples["image"]), samples["label"])}

    @torch.no_grad()
    def generate(self, samples: dict, **kwargs) -> list[str]:
        return [CAPTIONS[bool(s > 0)][0] for s in self.score(samples["image"])]

    @torch.no_grad()
    def predict_answers(self, samples: dict, **kwargs) -> list[str]:
        return [ANSWERS[bool(s > 0)][0] for s in self.score(samples["image"])]

    @classmethod
    def default_config_path(cls, model_type: str = "default") -> str:
        return _default_config("model.yaml", {"model": {"arch": "evlgen_toy", "hidden_dim": 8, "seed": 0}})

    @classmethod
    def from_config(cls, cfg):
        return cls(hidden_dim=int(cfg.get("hidden_dim", 8)), seed=int(cfg.get("seed", 0)), dropout=float(cfg.get("dropout", 0.0)))


class ToyDataset(Dataset):
    """Records {"x": [4], "y": float, "image_id": int, "question_id": int, "question": str};
    ``ground_truth()`` gives captions (kind "caption") or answers (kind "vqa"). ``noise`` (default
    0) adds an augmentation drawn from NumPy's and Python's generators to x."""

    def __init__(self, records: list[dict], kind: str, noise: float = 0.0):
        self.records, self.kind, self.noise = records, kind, noise

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        x = torch.tensor(r["x"])
        if self.noise:
            x = x + self.noise * torch.from_numpy(np.random.randn(IN_DIM) + random.gauss(0.0, 1.0)).float()
        return {
            "image": x,
            "label": torch.tensor(r["y"]),
            "image_id": r["image_id"],
            "question_id": r["question_id"],
            "text_input": r["question"],
        }

    def collater(self, samples: list[dict]) -> dict:
        return default_collate(samples)

    def ground_truth(self) -> dict[int, list[str]]:
        if self.kind == "caption":
            return {r["image_id"]: CAPTIONS[r["y"] > 0] for r in self.records}
        return {r["question_id"]: ANSWERS[r["y"] > 0] for r in self.records}


@registry.register_builder("evlgen_toy_data")
class ToyBuilder(BaseDatasetBuilder):
    """Reads ``build_info.annotations.<split>.storage`` (absolute json paths); ``build_info.kind``, ``build_info.noise``."""

    train_dataset_cls = eval_dataset_cls = ToyDataset

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:
        return _default_config("data.yaml", {"datasets": {"evlgen_toy_data": {"data_type": "images", "build_info": {}}}})

    def _download_data(self):
        pass  # local files only

    def build(self) -> dict:
        info = self.config.build_info
        return {
            split: ToyDataset(json.loads(Path(ann.storage).read_text()), info.get("kind", "caption"), float(info.get("noise", 0.0)))
            for split, ann in info.annotations.items()
        }


def write_toy_data(root: Path, n_train: int = 16, n_eval: int = 8, seed: int = 0) -> dict[str, str]:
    """Write train/val/test json records under ``root``; the label is a fixed linear function
    of x. Returns split -> absolute path."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5])
    paths, offset = {}, 0
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        x = torch.randn(n, IN_DIM, generator=generator)
        records = [
            {"x": xi.tolist(), "y": float(xi @ w), "image_id": offset + i, "question_id": 1000 + offset + i,
             "question": "how many dogs are there?"}
            for i, xi in enumerate(x)
        ]
        offset += n
        paths[split] = str((root / f"{split}.json").resolve())
        Path(paths[split]).write_text(json.dumps(records))
    return paths


def write_toy_config(root: Path, task: str = "evlgen_vqa", model: dict | None = None, noise: float = 0.0, **run_overrides) -> Path:
    """A complete LAVIS run config on the toy data (written by ``write_toy_data`` first); ``model``
    adds model options (e.g. dropout), ``noise`` the data augmentation's."""
    paths = write_toy_data(root)
    run = {
        "task": task,
        "runner": "runner_evlgen",
        "device": "cpu",
        "lr_sched": "linear_warmup_cosine_lr",
        "init_lr": 0.05,
        "min_lr": 0.001,
        "warmup_lr": 0.01,
        "warmup_steps": 2,
        "weight_decay": 0.05,
        "max_epoch": 2,
        "batch_size_train": 4,
        "batch_size_eval": 4,
        "num_workers": 0,
        "seed": 42,
        "amp": False,
        "evaluate": False,
        "log_freq": 2,
        "num_beams": 1,
        "max_len": 10,
        "min_len": 1,
        "train_splits": ["train"],
        "valid_splits": ["val"],
        "test_splits": ["test"],
        "output_dir": str(root / "output"),
        "dist_url": "env://",
        **run_overrides,
    }
    config = {
        "model": {"arch": "evlgen_toy", "model_type": "default", **(model or {})},
        "datasets": {
            "evlgen_toy_data": {
                "build_info": {
                    "kind": "caption" if task == "evlgen_captioning" else "vqa",
                    "noise": noise,
                    "annotations": {split: {"storage": path} for split, path in paths.items()},
                }
            }
        },
        "run": run,
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # train.py is a script at the repo root
    import train

    train.main()
