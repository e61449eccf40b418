"""Build a tiny random-weight MusicGen (about 1 MB) for tests and CPU demos, fully offline.

    python -m models.musicgen.tiny OUT_DIR

The folder has the layout of ``facebook/musicgen-small`` (config.json,
generation_config.json, model.safetensors, processor and tokenizer files), so the
service loads it through the same ``from_pretrained`` code as the real weights. The
audio is noise, but its geometry is real: 32 kHz mono, 50 frames a second, 4
codebooks, so durations and sample counts behave exactly as with the real model.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Any

from models.build_tiny import portable_tokenizer_configs

SEED = 0
SAMPLING_RATE = 32_000
CODEBOOK_SIZE = 64  # the decoder's vocabulary; pad/bos = CODEBOOK_SIZE, as in the real model (2048/2048)


def _tokenizer() -> Any:
    """A 57-entry T5 Unigram tokenizer from an in-memory vocabulary (the hub's would need a download)."""
    from transformers import T5TokenizerFast

    letters = list(string.ascii_lowercase)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
             *((c, -3.0) for c in letters), *(("▁" + c, -3.0) for c in letters)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _config() -> Any:
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    text = T5Config(vocab_size=128, d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8)
    # upsampling_ratios multiply to the hop (640 samples = 50 Hz at 32 kHz); with 2.2 kbps
    # that gives 4 quantizers, matching num_codebooks. [8,5,4,2] would give 100 Hz and
    # 2 quantizers, and generate() then fails with an IndexError.
    audio = EncodecConfig(hidden_size=16, num_filters=4, codebook_size=CODEBOOK_SIZE, codebook_dim=16, compress=1,
                          sampling_rate=SAMPLING_RATE, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
                          num_lstm_layers=1)
    decoder = MusicgenDecoderConfig(vocab_size=CODEBOOK_SIZE, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, ffn_dim=32, max_position_embeddings=2048,
                                    num_codebooks=4, pad_token_id=CODEBOOK_SIZE, bos_token_id=CODEBOOK_SIZE,
                                    decoder_start_token_id=CODEBOOK_SIZE, tie_word_embeddings=False,
                                    audio_channels=1)
    return MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())


def _randomise_codebooks(model: Any) -> None:
    """Give the EnCodec codebooks random vectors.

    A fresh EncodecModel's codebooks are buffers of zeros (real ones come from training),
    so every code would decode to the same audio and the seed would make no difference.
    """
    import torch

    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            codebook = layer.codebook
            codebook.embed.normal_()
            codebook.embed_avg.copy_(codebook.embed)
            codebook.cluster_size.fill_(1.0)


def build(out_dir: Path) -> Path:
    """Write the tiny model and its processor into ``out_dir``; return ``out_dir``."""
    import torch
    from transformers import (
        EncodecFeatureExtractor,
        GenerationConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)  # the same weights on every build
    model = MusicgenForConditionalGeneration(_config()).eval()
    _randomise_codebooks(model)
    # Mirrors musicgen-small's generation_config.json: sampling with classifier-free guidance.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=CODEBOOK_SIZE, pad_token_id=CODEBOOK_SIZE, bos_token_id=CODEBOOK_SIZE,
        do_sample=True, guidance_scale=3.0, top_k=50, max_length=1500)
    model.save_pretrained(out_dir)
    processor = MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLING_RATE),
        tokenizer=_tokenizer())
    processor.save_pretrained(out_dir)
    portable_tokenizer_configs(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random MusicGen model (offline).")
    parser.add_argument("out", type=Path, help="folder to write the model into")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
