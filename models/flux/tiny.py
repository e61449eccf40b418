"""Build a tiny random-weight FluxPipeline, fully offline, for tests and the CPU demo.

    python -m models.flux.tiny OUT_DIR

The folder has the same layout as black-forest-labs/FLUX.1-schnell (model_index.json
plus scheduler/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ transformer/ vae/),
so the service loads it with the same ``from_pretrained`` call as the real weights.
Shapes follow diffusers' own Flux pipeline tests; the tokenizers are built from
in-memory vocabularies because the usual tiny test tokenizers live on the hub.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Any

from models.build_tiny import portable_tokenizer_configs

SEED = 0
CLIP_HIDDEN = 32  # must equal the transformer's pooled_projection_dim
T5_D_MODEL = 32  # must equal the transformer's joint_attention_dim


def _clip_tokenizer() -> Any:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(ch + "</w>" for ch in alphabet)]
    vocab = {token: i for i, token in enumerate(tokens)}
    # FluxPipeline pads CLIP input to model_max_length; the default (~1e30) would never fit.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    letters = string.ascii_lowercase
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0),
             *((ch, -3.0) for ch in letters), *(("\u2581" + ch, -2.5) for ch in letters)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _text_encoders() -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CLIP_HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=32,
        max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(
        vocab_size=1000, d_model=T5_D_MODEL, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return clip, t5


def _image_models() -> tuple[Any, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_D_MODEL, pooled_projection_dim=CLIP_HIDDEN,
        axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    return transformer, vae


def build(out_dir: Path) -> Path:
    """Build the tiny pipeline into ``out_dir`` (same seed → same weights) and return it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(SEED)
    transformer, vae = _image_models()
    clip, t5 = _text_encoders()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=clip, text_encoder_2=t5,
        tokenizer=_clip_tokenizer(), tokenizer_2=_t5_tokenizer(), transformer=transformer, vae=vae)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir))
    _name_fast_tokenizers(out_dir / "model_index.json")
    portable_tokenizer_configs(out_dir)
    return out_dir


def _name_fast_tokenizers(index: Path) -> None:
    """Name the tokenizers' fast classes, as FLUX.1-schnell's model_index.json does for tokenizer_2.

    transformers 5 has one class per tokenizer and records "T5Tokenizer"; transformers 4 (the
    torch 2.9.1 stack's) reads that as its slow, sentencepiece class, which needs a spiece.model
    these tiny tokenizers do not have. The fast names load tokenizer.json on both.
    """
    import json

    spec = json.loads(index.read_text())
    spec["tokenizer"], spec["tokenizer_2"] = ["transformers", "CLIPTokenizerFast"], ["transformers", "T5TokenizerFast"]
    index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight FluxPipeline (offline).")
    parser.add_argument("out", type=Path, help="folder to write the pipeline into")
    args = parser.parse_args()
    print(build(args.out))


if __name__ == "__main__":
    main()
