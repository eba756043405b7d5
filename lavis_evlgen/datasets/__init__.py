"""Offline datasets and the paper's. Importing this package registers the ``shapes_caption``,
``shapes_vqa`` and ``shapes_video_caption`` builders, the ``evlgen_video_headtail`` processor, and the
paper's ``laion115M``, ``ccs14M`` and ``flickr30k_caption`` builders with LAVIS's registry."""
from lavis_evlgen.datasets import builders, paper_data, video_builders  # noqa: F401  (registers the builders)
from lavis_evlgen.datasets.shapes_video import ensure_shapes_video, generate_shapes_video, shapes_video_dir
from lavis_evlgen.datasets.shapes_world import ensure_shapes_world, generate_shapes_world, shapes_world_dir

__all__ = ["ensure_shapes_video", "ensure_shapes_world", "generate_shapes_video", "generate_shapes_world",
           "shapes_video_dir", "shapes_world_dir"]
