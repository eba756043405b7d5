"""Tiny random models for unit tests and smoke runs (deterministic: seed 0).

Each ``build_*`` fills an empty directory with a saved Hugging Face model (config + weights) and
its tokenizer or image-processor config, so ``from_pretrained(dir)`` works like on a real
checkpoint. Vocabularies are real (GPT-2 BPE, bert-base-uncased WordPiece from the packaged
copies), so text goes through the same tokenization as with the full-size models.

Token ids of the tiny LMs: the GPT-2 BPE has a single special token, ``<|endoftext|>`` = 50256,
used as BOS, EOS and pad. The tokenizers *prepend* it as BOS (``add_bos_token=True``) because
OPT and LLaMA checkpoints are trained with a BOS first (real OPT uses ``</s>`` = 2; the id differs,
the convention is kept). Padding should be masked with the attention mask, not by token id,
since pad == BOS == EOS here.
"""
from pathlib import Path

import torch

from lavis_evlgen.assets import packaged

SEED = 0
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
MAX_POSITIONS = 128


def _save_seeded(model_fn, out_dir: Path) -> None:
    """Build ``model_fn()`` under a fixed seed (without touching the caller's RNG) and save it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_fn()
    model.save_pretrained(out_dir)


def _save_gpt2_bpe_tokenizer(out_dir: Path) -> None:
    from transformers import GPT2Tokenizer

    packaged.write_gpt2_bpe_files(out_dir)
    tokenizer = GPT2Tokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
        add_bos_token=True, pad_token=ENDOFTEXT, model_max_length=MAX_POSITIONS,
    )
    tokenizer.save_pretrained(out_dir)


def build_tiny_opt(out_dir: Path) -> dict:
    """OPTForCausalLM: 2 layers, hidden 64, 4 heads, ffn 128, GPT-2 BPE vocab (50,257), 128 positions."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=GPT2_VOCAB_SIZE, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
        num_attention_heads=4, ffn_dim=128, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID,
    )
    _save_seeded(lambda: OPTForCausalLM(config), out_dir)
    _save_gpt2_bpe_tokenizer(out_dir)
    return {"source": f"random (seed {SEED})"}


def build_tiny_llama(out_dir: Path) -> dict:
    """LlamaForCausalLM: 2 layers, hidden 64, 4 heads (2 KV heads), intermediate 128, GPT-2 BPE vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=GPT2_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID,
    )
    _save_seeded(lambda: LlamaForCausalLM(config), out_dir)
    _save_gpt2_bpe_tokenizer(out_dir)
    return {"source": f"random (seed {SEED})"}


def build_tiny_bert(out_dir: Path) -> dict:
    """BertModel: 2 layers, hidden 64, 4 heads, intermediate 128, bert-base-uncased WordPiece (30,522)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = packaged.require(packaged.MINILM, "model/vocab.txt")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=512)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, pad_token_id=tokenizer.pad_token_id,
    )
    _save_seeded(lambda: BertModel(config), out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"source": f"random (seed {SEED})"}


def build_tiny_vit(out_dir: Path) -> dict:
    """Dinov2Model: 224 px, patch 14 (1 CLS + 16 x 16 patches = 257 tokens), hidden 64, 2 layers, 4 heads."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
        image_size=224, patch_size=14, use_mask_token=False,
    )
    _save_seeded(lambda: Dinov2Model(config), out_dir)
    BitImageProcessor(
        do_resize=True, size={"height": 224, "width": 224}, resample=3, do_center_crop=False,
        image_mean=list(packaged.IMAGENET_MEAN), image_std=list(packaged.IMAGENET_STD),
    ).save_pretrained(out_dir)
    return {"source": f"random (seed {SEED})"}
