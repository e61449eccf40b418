"""Whisper's decoding of one request, on the worker thread: Hugging Face's ``generate`` with timestamps.

Audio up to 30 s is one window (padded to 3000 frames); longer audio goes through generate's
sequential long-form decoding (OpenAI's algorithm: each window starts where the last complete
segment ended, the previous text as the prompt). Segments come back with their times and tokens;
the window's scores give its mean token log-probability. A cancelled request stops at the decoder's
next step (a forward pre-hook that checks the job). torch is imported by the caller's model only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.whisper.formats import Segment, Transcript, Word, compression_ratio

WINDOW_SAMPLES = 30 * 16_000


@dataclass(frozen=True)
class Request:
    task: str  # transcribe or translate
    language: str | None  # an ISO code (en) or None: detected
    prompt: str | None
    temperature: float
    words: bool  # timestamp_granularities[] includes word
    max_new_tokens: int


def transcribe(model: Any, processor: Any, samples: Any, request: Request, check: Any) -> Transcript:
    """``samples`` (16 kHz mono) as a Transcript; ``check()`` raises when the job was cancelled."""
    import torch

    duration = len(samples) / 16_000
    features = _features(processor, samples, model)
    language = request.language or _detect(model, processor, features["input_features"])
    kwargs: dict[str, Any] = {"task": request.task, "language": language, "return_timestamps": True,
                              "return_segments": True, "return_dict_in_generate": True, "output_scores": True,
                              "max_new_tokens": request.max_new_tokens}
    if request.temperature > 0:
        kwargs.update(do_sample=True, temperature=request.temperature)
    if request.prompt:
        kwargs["prompt_ids"] = processor.get_prompt_ids(request.prompt, return_tensors="pt").to(model.device)
    if request.words:
        kwargs["return_token_timestamps"] = True
    hook = model.model.decoder.register_forward_pre_hook(lambda module, args: check())
    try:
        with torch.inference_mode():
            out = model.generate(**features, **kwargs)
    finally:
        hook.remove()
    segments = _segments(out["segments"][0], processor.tokenizer, request.temperature, duration)
    words = _words(out["segments"][0], segments, processor.tokenizer) if request.words else None
    return Transcript(request.task, _language_name(language), duration, segments, words)


def _features(processor: Any, samples: Any, model: Any) -> dict[str, Any]:
    if len(samples) <= WINDOW_SAMPLES:  # one window, padded to 30 s as the model expects
        inputs = processor(samples, sampling_rate=16_000, return_tensors="pt", return_attention_mask=True)
    else:
        inputs = processor(samples, sampling_rate=16_000, return_tensors="pt", truncation=False, padding="longest",
                           return_attention_mask=True)
    return {"input_features": inputs.input_features.to(model.device, model.dtype),
            "attention_mask": inputs.attention_mask.to(model.device)}


def _detect(model: Any, processor: Any, features: Any) -> str:
    """The spoken language's code, from the first window (Whisper's own language detection)."""
    import torch

    with torch.inference_mode():
        token = int(model.detect_language(features[..., :3000])[0])
    return str(processor.tokenizer.convert_ids_to_tokens(token)).strip("<|>")


def _language_name(code: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    name: str = LANGUAGES.get(code, code)
    return name


def _segments(found: list[dict[str, Any]], tokenizer: Any, temperature: float, duration: float) -> list[Segment]:
    """Segments in order, their times kept within the audio (a window's padding holds no speech)."""
    segments: list[Segment] = []
    logprobs: dict[int, float] = {}
    for item in found:
        start = min(float(item["start"]), duration)
        if start >= duration and segments:
            break
        tokens = [int(t) for t in item["tokens"]]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        result = item.get("result")
        window = id(result)
        if window not in logprobs:
            logprobs[window] = _mean_logprob(result)
        segments.append(Segment(len(segments), round(start * 100), round(start, 2),
                                round(min(float(item["end"]), duration), 2), text, tokens, temperature,
                                logprobs[window], round(compression_ratio(text), 3)))
    return segments


def _mean_logprob(result: Any) -> float:
    """The mean log-probability of the tokens a window decoded (from generate's scores)."""
    import torch

    if not isinstance(result, dict) or not result.get("scores"):
        return 0.0
    # generate's per-window result: each step's logits over the vocabulary, and the window's tokens (one row)
    scores = torch.stack([step.reshape(-1, step.shape[-1])[0] for step in result["scores"]]).float()
    sequence = result["sequences"].reshape(-1)
    chosen = sequence[-len(scores):].to(scores.device)
    picked = torch.log_softmax(scores, dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
    finite = picked[torch.isfinite(picked)]
    return round(float(finite.mean()), 4) if len(finite) else 0.0


def _words(found: list[dict[str, Any]], segments: list[Segment], tokenizer: Any) -> list[Word]:
    """Words with times from the tokens' own (cross-attention alignment, dynamic time warping: generate's
    ``return_token_timestamps``): a word starts at its first token's time and ends where the next word
    starts, the last of a segment at the segment's end."""
    words: list[Word] = []
    for item, segment in zip(found, segments, strict=False):
        times = [float(t) for t in item.get("token_timestamps", [])]
        pieces: list[tuple[str, float]] = []
        for token, at in zip([int(t) for t in item["tokens"]], times, strict=False):
            if token >= tokenizer.eos_token_id:  # special tokens and timestamps are not words
                continue
            text = tokenizer.decode([token])
            if not pieces or text.startswith(" "):
                pieces.append((text.strip(), at))
            else:
                pieces[-1] = (pieces[-1][0] + text, pieces[-1][1])
        for i, (word, at) in enumerate(pieces):
            end = pieces[i + 1][1] if i + 1 < len(pieces) else segment.end
            if word:
                words.append(Word(word, round(min(at, segment.end), 2), round(max(min(end, segment.end), at), 2)))
    return words
