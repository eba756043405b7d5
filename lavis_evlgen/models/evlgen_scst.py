"""EVLGen-image models with the SCST loss mode (``models/scst.py``): ``evlgen_opt_scst``, ``evlgen_vicuna_scst``.

Same architecture, model types, parameters and checkpoints as ``evlgen_opt``/``evlgen_vicuna``
(a checkpoint trained with the captioning loss loads as is); the config also takes the
``SCSTConfig`` keys, and with ``scst: true`` the training forward returns the SCST loss. With
``scst: false`` (the default) they behave exactly as their parents.
"""
from dataclasses import dataclass

from lavis.common.registry import registry

from lavis_evlgen.models.evlgen import EVLGenConfig, EVLGenOPT, EVLGenVicuna
from lavis_evlgen.models.scst import SCSTConfig, SCSTMixin


@dataclass
class EVLGenSCSTConfig(SCSTConfig, EVLGenConfig):
    """``EVLGenConfig`` + the SCST knobs."""


@registry.register_model("evlgen_opt_scst")
class EVLGenOPTSCST(SCSTMixin, EVLGenOPT):
    """``evlgen_opt`` with the SCST loss mode."""

    CONFIG_CLASS = EVLGenSCSTConfig


@registry.register_model("evlgen_vicuna_scst")
class EVLGenVicunaSCST(SCSTMixin, EVLGenVicuna):
    """``evlgen_vicuna`` with the SCST loss mode."""

    CONFIG_CLASS = EVLGenSCSTConfig
