"""lavis-evlgen: EVLGen (Jian et al., ACL 2024) as a Salesforce LAVIS plugin.

Importing this package registers its models, processors, tasks, dataset builders and runners
with LAVIS's registry, so ``lavis.models.load_model("evlgen_opt", ...)`` and LAVIS's
``train.py``-style configs find them.
"""
import lavis_evlgen.datasets  # noqa: F401  (registers the shapes-world builders)
import lavis_evlgen.models  # noqa: F401  (registers evlgen_opt, evlgen_vicuna)
import lavis_evlgen.runners  # noqa: F401  (registers runner_evlgen, runner_evlgen_iter)
import lavis_evlgen.tasks  # noqa: F401  (registers evlgen_captioning, evlgen_vqa)


def model_zoo():
    """A fresh LAVIS model-zoo listing (LAVIS builds ``lavis.models.model_zoo`` once at import,
    before plugins register): ``print(lavis_evlgen.model_zoo())``."""
    from lavis.models import ModelZoo

    return ModelZoo()
