"""A transcript in OpenAI's response formats: json, text, srt, vtt and verbose_json. Pure functions.

Segments carry what openai-whisper's do: the decoding window's ``seek`` (in 10 ms frames), times,
text, token ids, the temperature decoded at, the window's mean token log-probability and its
text's compression ratio (zlib, as whisper computes it). ``no_speech_prob`` is null: Hugging Face's
generate computes it only to skip silent windows and does not return it.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Transcript:
    task: str  # transcribe or translate
    language: str  # its name in English, lower case, as OpenAI's verbose_json gives it
    duration: float
    segments: list[Segment]
    words: list[Word] | None = None  # asked for with timestamp_granularities[]=word

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments).strip()


def compression_ratio(text: str) -> float:
    """How much zlib shrinks ``text`` (whisper flags a window over 2.4 as repetitive)."""
    raw = text.encode()
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def clock(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SRT) or ``HH:MM:SS.mmm`` (WebVTT)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def srt(transcript: Transcript) -> str:
    return "".join(f"{i}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(_cues(transcript), start=1))


def vtt(transcript: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in _cues(transcript))


def _cues(transcript: Transcript) -> list[Segment]:
    """The segments with words in them: a cue without text ends a subtitle file for many players."""
    return [segment for segment in transcript.segments if segment.text.strip()]


def body(transcript: Transcript, response_format: str) -> str | dict[str, Any]:
    """The response: a string for text, srt and vtt, a JSON object for json and verbose_json."""
    if response_format == "text":
        return transcript.text + "\n"
    if response_format == "srt":
        return srt(transcript)
    if response_format == "vtt":
        return vtt(transcript)
    usage = {"type": "duration", "seconds": round(transcript.duration)}
    if response_format == "json":
        return {"text": transcript.text, "usage": usage}
    verbose: dict[str, Any] = {"task": transcript.task, "language": transcript.language,
                               "duration": round(transcript.duration, 3), "text": transcript.text,
                               "segments": [asdict(segment) for segment in transcript.segments], "usage": usage}
    if transcript.words is not None:
        verbose["words"] = [asdict(word) for word in transcript.words]
    return verbose
