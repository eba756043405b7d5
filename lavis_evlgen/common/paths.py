"""Where lavis-evlgen keeps converted weights, generated data and run outputs.

Everything downloaded, converted or generated at run time goes under one cache root,
movable with the ``EVLGEN_CACHE`` environment variable (default ``~/.cache/lavis_evlgen``).
Nothing under it is ever committed.
"""
import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = PACKAGE_ROOT / "configs"


def cache_root() -> Path:
    """The cache directory (created on first use)."""
    root = Path(os.environ.get("EVLGEN_CACHE", Path.home() / ".cache" / "lavis_evlgen")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_type_configs(arch: str, model_types: list[str]) -> dict[str, str]:
    """A LAVIS ``PRETRAINED_MODEL_CONFIG_DICT``: model type -> configs/models/<arch>/<type>.yaml."""
    return {name: str(CONFIG_ROOT / "models" / arch / f"{name}.yaml") for name in model_types}
