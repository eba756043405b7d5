"""EVLGen models (registered with LAVIS on import), the TomeFormer connector and the merge math."""
from lavis_evlgen.models.evlgen import EVLGen, EVLGenConfig, EVLGenOPT, EVLGenVicuna
from lavis_evlgen.models.tomeformer import TomeFormer

__all__ = ["EVLGen", "EVLGenConfig", "EVLGenOPT", "EVLGenVicuna", "TomeFormer"]
