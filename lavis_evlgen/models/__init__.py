"""Models registered with LAVIS on import: EVLGen image and video (each with the SCST loss mode), the BLIP-2 baselines; the TomeFormer connector and the merge math."""
from lavis_evlgen.models.blip2 import BLIP2, BLIP2OPT, BLIP2Config, BLIP2Stage1, BLIP2Stage1Config, BLIP2Vicuna
from lavis_evlgen.models.evlgen import EVLGen, EVLGenConfig, EVLGenOPT, EVLGenVicuna
from lavis_evlgen.models.evlgen_video import EVLGenVideo, EVLGenVideoConfig, EVLGenVideoOPT, EVLGenVideoVicuna
from lavis_evlgen.models.prefix_lm import PrefixLM, PrefixLMConfig
from lavis_evlgen.models.tomeformer import TomeFormer

__all__ = [
    "BLIP2", "BLIP2Config", "BLIP2OPT", "BLIP2Stage1", "BLIP2Stage1Config", "BLIP2Vicuna",
    "EVLGen", "EVLGenConfig", "EVLGenOPT", "EVLGenVicuna",
    "EVLGenVideo", "EVLGenVideoConfig", "EVLGenVideoOPT", "EVLGenVideoVicuna",
    "PrefixLM", "PrefixLMConfig", "TomeFormer",
]
