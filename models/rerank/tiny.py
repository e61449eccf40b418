"""Build a tiny random-weight cross-encoder reranker (about 100 KB), saved like BAAI/bge-reranker-v2-m3.

    python -m models.rerank.tiny OUT_DIR

The real reranker is an XLM-RoBERTa sequence classifier with one label (a relevance logit) and
8192 positions; this one has the same architecture, label count and positions with 2 small
layers, and an XLM-R Unigram tokenizer over an in-memory vocabulary (the hub's would need a
download). It loads through the same sentence-transformers ``CrossEncoder`` code as the real
weights; its scores are noise, which is all tests need (their order follows them).
"""

from __future__ import annotations

import string
import sys
from pathlib import Path
from typing import Any

SEED = 0
_WORDS = ["the", "a", "of", "is", "in", "cat", "dog", "sits", "mat", "paris", "capital", "france", "berlin",
          "germany", "what", "city", "gpu", "model", "music", "image"]


def _tokenizer() -> Any:
    from transformers import XLMRobertaTokenizerFast

    letters = list(string.ascii_lowercase + string.digits)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
             *((c, -3.0) for c in letters), *(("▁" + c, -3.0) for c in letters),
             *(("▁" + w, -1.0) for w in _WORDS), ("<mask>", 0.0)]
    return XLMRobertaTokenizerFast(vocab=vocab, model_max_length=8192)


def build(out_dir: Path) -> Path:
    """Write the tiny reranker and its tokenizer into ``out_dir``; return ``out_dir``."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(SEED)
    tokenizer = _tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=8194, num_labels=1,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id,
                              architectures=["XLMRobertaForSequenceClassification"])
    model = XLMRobertaForSequenceClassification(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-rerank")))
