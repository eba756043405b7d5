"""Pretrained parts, offline: local paths, builtin tiny/packaged models and hub ids (see ``resolver``)."""
from lavis_evlgen.assets.resolver import describe, list_builtin_names, resolve_pretrained

__all__ = ["describe", "list_builtin_names", "resolve_pretrained"]
