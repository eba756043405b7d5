"""A run's LAVIS config, checked before anything is built (train.py, evaluate.py).

LAVIS's ``Config`` looks every name up in its registry and fails on an unknown one with
``AttributeError: 'NoneType' ...`` or a bare assertion, and its ``build_model_config`` looks
``--options model.model_type=NAME`` up under a key that never exists, so the yaml's model type is
built while the run records NAME. ``RunConfig`` is LAVIS's ``Config`` with:

- ``check_names``: model arch and type, datasets (and their config type), task and runner, from
  the yaml merged with ``--options``, each must be registered; the error names the key, the value,
  where it came from, and the registered names; a dataset's builder must have a default config
  keyed by the dataset's name (else LAVIS merges none of it: ``check_default_config_key``);
- ``model.arch`` / ``model.model_type`` given by ``--options`` choose the model defaults loaded;
- ``check_image_sizes``: every dataset processor's ``image_size`` equals ``model.image_size`` (the
  ViT and its token count are built for that size; the model checks it against its patches and
  position embeddings, and its soft prompts against the LLM's positions, when built);
- layered project configs (``load_config``): a yaml may name ``base: other.yaml`` (or a list of
  them), paths relative to its own folder; the bases are merged first (OmegaConf, later wins,
  lists replaced), then the file itself. Bases may have bases; a cycle or a missing file is an
  error naming the chain. A row of a table is thus its base plus the keys it changes (README,
  "Paper scale").
"""
import argparse
import io
import os
from pathlib import Path

from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf

# train.py's runner when run.runner is not set.
DEFAULT_RUNNER = "runner_evlgen"
# The key of a project yaml that names the config(s) it extends.
BASE_KEY = "base"


def load_config(path) -> DictConfig:
    """A project yaml with its ``base`` chain merged in (see the module docstring); the result has
    no ``base`` key. FileNotFoundError / ValueError name the file that refers to a missing base or
    closes a cycle."""
    return _load_layered(Path(os.path.abspath(path)), ())


def _load_layered(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    if path in chain:
        raise ValueError(f"{BASE_KEY}: cycle {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        referrer = f" ({BASE_KEY} of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config {path} does not exist{referrer}")
    config = OmegaConf.load(path)
    bases = config.pop(BASE_KEY, None)
    if bases is None:
        return config
    if isinstance(bases, str):
        bases = [bases]
    elif not OmegaConf.is_list(bases) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged = [_load_layered(Path(os.path.abspath(path.parent / base)), (*chain, path)) for base in bases]
    return OmegaConf.merge(*merged, config)


def _unknown(key: str, value, where: str, known) -> KeyError:
    return KeyError(f"{key}: {value!r} ({where}) is not registered; registered: {sorted(known)}")


def check_names(config, option_keys: set[str], cfg_path: str) -> None:
    """KeyError for the first unknown arch, model type, dataset (or dataset config type), task or
    runner in ``config`` (the yaml merged with the options; ``option_keys``: the keys the options set)."""
    def where(key: str) -> str:
        return "from --options" if any(k == key or k.startswith(key + ".") for k in option_keys) else f"in {cfg_path}"

    model = config.get("model") or {}
    arch = model.get("arch")
    model_cls = registry.get_model_class(arch) if arch is not None else None
    if model_cls is None:
        raise _unknown("model.arch", arch, where("model.arch"), registry.mapping["model_name_mapping"])
    model_type = model.get("model_type")
    types = getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", {})
    try:  # the class decides (LAVIS's asserts the type is in its table; a class may build its own)
        model_cls.default_config_path(model_type=model_type)
    except (AssertionError, KeyError) as error:
        raise KeyError(f"model.model_type: {model_type!r} ({where('model.model_type')}) is not a model type of "
                       f"{arch!r}; its types: {sorted(types)}") from error
    datasets = config.get("datasets") or {}
    if not datasets:
        raise KeyError(f"{cfg_path}: no datasets (the config needs a 'datasets' section)")
    for name, dataset_cfg in datasets.items():
        builder = registry.get_builder_class(name)
        if builder is None:
            raise _unknown(f"datasets.{name}", name, where(f"datasets.{name}"), registry.mapping["builder_name_mapping"])
        config_type = (dataset_cfg or {}).get("type", "default")
        try:
            default_path = builder.default_config_path(type=config_type)
        except (AssertionError, KeyError) as error:
            raise KeyError(f"datasets.{name}.type: {config_type!r} ({where(f'datasets.{name}.type')}) is not a config "
                           f"type of {name!r}; its types: {sorted(getattr(builder, 'DATASET_CONFIG_DICT', {}))}") from error
        check_default_config_key(name, default_path, where(f"datasets.{name}"))
    run = config.get("run") or {}
    task = run.get("task")
    if registry.get_task_class(task) is None:
        raise _unknown("run.task", task, where("run.task"), registry.mapping["task_name_mapping"])
    runner = run.get("runner", DEFAULT_RUNNER)
    if registry.get_runner_class(runner) is None:
        raise _unknown("run.runner", runner, where("run.runner"), registry.mapping["runner_name_mapping"])


def check_default_config_key(name: str, default_path: str, where: str) -> None:
    """KeyError when the default config of dataset ``name``'s builder is keyed by another name:
    LAVIS's ``Config`` merges the project's ``datasets.<name>`` with it by key, so none of its
    defaults would reach the builder (LAVIS 1.0.2's ``msrvtt_caption``, keyed ``msrvtt_cap``)."""
    keys = list(OmegaConf.load(default_path).get("datasets") or {})
    if keys == [name]:
        return
    registered = [key for key in keys if registry.get_builder_class(key) is not None]
    remedy = f"; use the builder registered as {' or '.join(registered)}" if registered else ""
    raise KeyError(f"datasets.{name} ({where}): its builder's default config {default_path} is keyed {keys}, not "
                   f"{name!r}, so LAVIS would merge none of its defaults into datasets.{name}{remedy}")


def check_image_sizes(config) -> None:
    """ValueError when a dataset's processor makes images of another size than ``model.image_size``."""
    model_size = config.model.get("image_size")
    if model_size is None:
        return
    for name, dataset_cfg in config.get("datasets", {}).items():
        for split, processor in (dataset_cfg.get("vis_processor") or {}).items():
            size = (processor or {}).get("image_size")
            if size is not None and size != model_size:
                raise ValueError(f"datasets.{name}.vis_processor.{split}.image_size={size} but model.image_size="
                                 f"{model_size}: the ViT, its token count and the soft prompts are built for "
                                 f"{model_size} px images; set both to the same size")


class RunConfig(Config):
    """LAVIS's Config of a layered project yaml (``load_config``), with names and image sizes
    checked and the model chosen by --options honoured."""

    def __init__(self, args):
        layered = load_config(args.cfg_path)
        dot_list = self._convert_to_dot_list(args.options or [])
        raw = OmegaConf.merge(layered, OmegaConf.from_dotlist(dot_list))
        check_names(raw, {item.split("=", 1)[0] for item in dot_list}, args.cfg_path)
        # LAVIS's Config reads cfg_path with OmegaConf.load, which also takes a stream: the merged yaml.
        super().__init__(argparse.Namespace(**{**vars(args), "cfg_path": io.StringIO(OmegaConf.to_yaml(layered))}))
        self.args = args
        check_image_sizes(self.config)

    @staticmethod
    def build_model_config(config, **kwargs):
        # LAVIS reads kwargs["model.model_type"], a key the nested options never have.
        chosen = {key: value for key, value in (kwargs.get("model") or {}).items() if key in ("arch", "model_type")}
        return Config.build_model_config(OmegaConf.merge(config, {"model": chosen}))
