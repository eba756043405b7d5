"""lavis-evlgen: EVLGen (Jian et al., ACL 2024) as a Salesforce LAVIS plugin.

Importing this package registers its models, processors, tasks, dataset builders and runners
with LAVIS's registry, so ``lavis.models.load_model("evlgen_opt", ...)`` and LAVIS's
``train.py``-style configs find them.
"""
import warnings

# LAVIS 1.0.2 imports timm 0.4 and fairscale, which decorate functions at import time with APIs
# torch 2 deprecates (torch.jit.script, torch.cuda.amp.custom_fwd/bwd): ~22 FutureWarnings no
# user of the plugin can act on. They are ignored only while LAVIS is imported, so the same
# deprecations raised by any other code still show.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
    warnings.filterwarnings(
        "ignore", r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated", FutureWarning, module=r"fairscale\."
    )
    import lavis  # noqa: F401

# LAVIS's coco_caption_datasets (imported by ``import lavis``) sets PIL's process-wide
# LOAD_TRUNCATED_IMAGES, so a truncated image would train as garbage; ours refuse it.
from PIL import ImageFile  # noqa: E402

ImageFile.LOAD_TRUNCATED_IMAGES = False

# LAVIS's train loop enters torch.cuda.amp.autocast(enabled=run.amp) at every step, deprecated
# since torch 2.4 (one FutureWarning per step where warnings repeat).
warnings.filterwarnings("ignore", r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", FutureWarning, module=r"lavis\.")

import lavis_evlgen.datasets  # noqa: F401  (registers the shapes-world builders)
import lavis_evlgen.models  # noqa: F401  (registers evlgen_opt, evlgen_vicuna, evlgen_video_*, blip2_baseline*)
import lavis_evlgen.runners  # noqa: F401  (registers runner_evlgen, runner_evlgen_iter)
import lavis_evlgen.tasks  # noqa: F401  (registers evlgen_captioning, evlgen_vqa)


def model_zoo():
    """A fresh LAVIS model-zoo listing (LAVIS builds ``lavis.models.model_zoo`` once at import,
    before plugins register): ``print(lavis_evlgen.model_zoo())``."""
    from lavis.models import ModelZoo

    return ModelZoo()
