"""models/whisper/formats.py and audio.py's pure parts: OpenAI's response formats from a transcript, and
audio resampled to 16 kHz (no model, no process)."""

from __future__ import annotations

import io
import json
import wave

import pytest

from models.whisper import audio
from models.whisper.formats import Segment, Transcript, Word, body, clock, compression_ratio

SEGMENTS = [Segment(0, 0, 0.0, 2.5, " Hello there.", [1, 2], 0.0, -0.2, 1.1),
            Segment(1, 250, 2.5, 3661.25, "", [3], 0.0, -0.4, 0.0),  # no words: no cue
            Segment(2, 366125, 3661.25, 3662.0, " Bye.", [4], 0.0, -0.3, 0.9)]
TRANSCRIPT = Transcript("transcribe", "english", 3662.0, SEGMENTS, [Word("Hello", 0.0, 1.0)])


def test_clocks_and_cues() -> None:
    assert clock(3661.25, ",") == "01:01:01,250" and clock(0.0004, ".") == "00:00:00.000"
    assert body(TRANSCRIPT, "srt") == ("1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
                                       "2\n01:01:01,250 --> 01:01:02,000\nBye.\n\n")
    assert body(TRANSCRIPT, "vtt") == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
                                       "01:01:01.250 --> 01:01:02.000\nBye.\n\n")
    assert body(TRANSCRIPT, "text") == "Hello there. Bye.\n"


def test_json_and_verbose_json() -> None:
    assert body(TRANSCRIPT, "json") == {"text": "Hello there. Bye.", "usage": {"type": "duration", "seconds": 3662}}
    verbose = body(TRANSCRIPT, "verbose_json")
    assert isinstance(verbose, dict)
    assert (verbose["task"], verbose["language"], verbose["duration"]) == ("transcribe", "english", 3662.0)
    assert verbose["segments"][2] == {"id": 2, "seek": 366125, "start": 3661.25, "end": 3662.0, "text": " Bye.",
                                      "tokens": [4], "temperature": 0.0, "avg_logprob": -0.3,
                                      "compression_ratio": 0.9, "no_speech_prob": None}
    assert verbose["words"] == [{"word": "Hello", "start": 0.0, "end": 1.0}]
    assert "words" not in json.loads(json.dumps(body(Transcript("translate", "french", 1.0, []), "verbose_json")))


def test_compression_ratio_is_whispers() -> None:
    assert compression_ratio("") == 0.0
    assert compression_ratio("la " * 200) > 2.4 > compression_ratio("The quick brown fox jumps over the lazy dog.")


def wav(samples: list[int], rate: int, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(channels)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    return out.getvalue()


def test_audio_is_mixed_to_mono_and_resampled_to_16_khz() -> None:
    stereo_44k = wav([1000, -1000] * 44_100, 44_100, channels=2)  # one second: left +, right -
    samples = audio.decode(stereo_44k, max_seconds=10)
    assert len(samples) == 16_000 and abs(float(samples.max())) < 1e-6  # the channels cancel out
    assert len(audio.decode(wav([0] * 8_000, 8_000), 10)) == 16_000


@pytest.mark.parametrize(("data", "says"), [
    (b"", "empty"),
    (wav([0] * 16_000 * 3, 16_000), "at most 2 s"),
    (wav([], 16_000), "no audio samples"),
])
def test_audio_that_cannot_be_used_says_why(data: bytes, says: str) -> None:
    with pytest.raises(audio.AudioProblem, match=says):
        audio.decode(data, max_seconds=2)
