"""An uploaded audio file as Whisper's input: mono float32 samples at 16 kHz.

libsndfile (the ``soundfile`` package) reads WAV, FLAC, OGG/Vorbis/Opus and MP3 in process; the
formats it cannot read (M4A/MP4, WebM, MPEG video) go through ``ffmpeg`` when it is installed.
Resampling is scipy's polyphase filter. numpy, scipy and soundfile are imported inside functions.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

RATE = 16_000  # what every Whisper's feature extractor expects
FFMPEG_TIMEOUT = 120.0


class AudioProblem(ValueError):
    """The file is not audio this service can read; the message says why and what would work."""


def decode(data: bytes, max_seconds: float) -> NDArray[np.float32]:
    """``data`` (a whole audio file) as mono float32 samples at 16 kHz; AudioProblem when it cannot be read
    or lasts longer than ``max_seconds``."""
    if not data:
        raise AudioProblem("the file is empty")
    try:
        samples, rate = _read_soundfile(data)
    except RuntimeError as exc:  # soundfile's LibsndfileError: a format libsndfile does not read
        samples, rate = _read_ffmpeg(data, str(exc)), RATE
    seconds = len(samples) / rate
    if seconds > max_seconds:
        raise AudioProblem(f"the audio lasts {seconds:.0f} s; this service takes at most {max_seconds:g} s")
    if not len(samples):
        raise AudioProblem("the file holds no audio samples")
    return resample(samples, rate)


def _read_soundfile(data: bytes) -> tuple[NDArray[np.float32], int]:
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1), int(rate)


def _read_ffmpeg(data: bytes, why: str) -> NDArray[np.float32]:
    import numpy as np

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioProblem(f"could not read the audio ({why.strip()}): WAV, FLAC, OGG and MP3 are read here; "
                           "M4A, MP4 and WebM need ffmpeg installed on the pod")
    done = subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1",
                           "-ar", str(RATE), "pipe:1"], input=data, capture_output=True, timeout=FFMPEG_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no detail"]
        raise AudioProblem(f"could not read the audio: ffmpeg says {detail[0]}")
    return np.frombuffer(done.stdout, dtype="<f4").copy()


def resample(samples: NDArray[np.float32], rate: int) -> NDArray[np.float32]:
    """``samples`` at ``rate`` Hz as 16 kHz (polyphase: exact ratios, no phase shift)."""
    import numpy as np

    if rate == RATE:
        return samples.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    common = math.gcd(rate, RATE)
    return np.asarray(resample_poly(samples, RATE // common, rate // common), dtype=np.float32)
