"""Offline datasets. Importing this package registers the ``shapes_caption`` and ``shapes_vqa``
builders with LAVIS's registry."""
from lavis_evlgen.datasets import builders  # noqa: F401  (registers the builders)
from lavis_evlgen.datasets.shapes_world import ensure_shapes_world, generate_shapes_world, shapes_world_dir

__all__ = ["ensure_shapes_world", "generate_shapes_world", "shapes_world_dir"]
