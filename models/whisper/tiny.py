"""Build a tiny random-weight Whisper (about 1 MB), saved like openai/whisper-large-v3-turbo, fully offline.

    python -m models.whisper.tiny OUT_DIR

The real model's geometry where the service can tell: 128 mel bins at 16 kHz, 30 s windows (3000
frames, 1500 encoder positions), 448 decoder positions, the same special tokens in the same order
(<|endoftext|>, <|startoftranscript|>, 100 languages, <|translate|>, <|transcribe|>, <|startoflm|>,
<|startofprev|>, <|nospeech|>, <|notimestamps|>, then <|0.00|> to <|30.00|>) and a generation config
with the same keys (language and task ids, timestamp rules, alignment heads for word timestamps).
A byte-level BPE tokenizer trained on a few sentences stands in for the 50k-token one (the hub's
would need a download). It loads through the same ``from_pretrained`` code as the real weights;
its transcripts are noise, which is all tests need.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from models.build_tiny import portable_tokenizer_configs

SEED = 0
MEL_BINS = 128  # large-v3 and its turbo variant; 80 before v3
_CORPUS = ["the cat sits on the mat", "a dog runs in the park", "hello world, this is a test of speech",
           "what time is it? It is ten past three.", "Bonjour, ça va ? Très bien, merci.", "Guten Tag!"]


def _special_tokens() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES),
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
            "<|notimestamps|>", *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(_CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair)
              for pair in json.loads(raw.to_str())["model"]["merges"]]
    tokenizer = WhisperTokenizerFast(vocab=raw.get_vocab(), merges=merges, model_max_length=448)
    tokenizer.add_special_tokens({"additional_special_tokens": _special_tokens()[1:]})  # endoftext: already in
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    return tokenizer


def _generation_config(tokenizer: Any, config: Any) -> Any:
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = tokenizer.convert_tokens_to_ids
    timestamp_begin = ids("<|0.00|>")
    return GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"), bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"), max_length=448,
        is_multilingual=True, lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50, begin_suppress_tokens=[ids("Ġ"), ids("<|endoftext|>")],  # a space, the end
        suppress_tokens=[], return_timestamps=False, forced_decoder_ids=None,
        alignment_heads=[[layer, head] for layer in range(config.decoder_layers)
                         for head in range(config.decoder_attention_heads)][:4],
        timestamp_begin=timestamp_begin)


def build(out_dir: Path) -> Path:
    """Write the tiny model, its processor and generation config into ``out_dir``; return ``out_dir``."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(SEED)
    tokenizer = _tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=MEL_BINS, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|endoftext|>"),
        decoder_start_token_id=ids("<|startoftranscript|>"), begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The feature extractor (preprocessor_config.json) and the tokenizer saved apart, as the real repository
    # has them (no processor_config.json): WhisperProcessor.from_pretrained assembles the two.
    WhisperFeatureExtractor(feature_size=MEL_BINS).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    portable_tokenizer_configs(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-whisper")))
