"""PCM16 helpers shared by the stand-in servers and the tests that drive them.

Kept free of provider logic so tests can build "speech" (a tone loud enough to
cross the stand-in's energy threshold) and silence without numpy.
"""

from __future__ import annotations

import math
import sys
from array import array

from livekit import rtc

__all__ = [
    "pcm16_rms",
    "silence_frames",
    "silence_pcm16",
    "tone_frames",
    "tone_pcm16",
]


def _samples(pcm: bytes) -> array[int]:
    """Little-endian int16 samples; a trailing odd byte is ignored."""
    samples = array("h")
    samples.frombytes(pcm[: len(pcm) - (len(pcm) % 2)])
    if sys.byteorder == "big":  # pragma: no cover - PCM on the wire is little-endian
        samples.byteswap()
    return samples


def pcm16_rms(pcm: bytes) -> float:
    """RMS energy of PCM16 audio, normalised to 0..1 so thresholds do not depend on format."""
    samples = _samples(pcm)
    if not samples:
        return 0.0
    total = math.fsum(float(s) * float(s) for s in samples)
    return math.sqrt(total / len(samples)) / 32768.0


def tone_pcm16(
    seconds: float,
    *,
    sample_rate: int = 16000,
    freq: float = 440.0,
    amplitude: float = 0.3,
    num_channels: int = 1,
    phase_samples: int = 0,
) -> bytes:
    """A sine tone as interleaved little-endian PCM16 (the same sample on every channel)."""
    count = round(seconds * sample_rate)
    peak = max(0.0, min(1.0, amplitude)) * 32767.0
    out = array("h")
    for i in range(count):
        value = int(peak * math.sin(2.0 * math.pi * freq * (i + phase_samples) / sample_rate))
        out.extend([value] * num_channels)
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def silence_pcm16(seconds: float, *, sample_rate: int = 16000, num_channels: int = 1) -> bytes:
    """Digital silence as PCM16."""
    return bytes(2 * num_channels * round(seconds * sample_rate))


def _split_frames(pcm: bytes, *, sample_rate: int, num_channels: int, frame_ms: int) -> list[rtc.AudioFrame]:
    per_frame = max(1, sample_rate * frame_ms // 1000)
    step = per_frame * 2 * num_channels
    frames: list[rtc.AudioFrame] = []
    for offset in range(0, len(pcm), step):
        chunk = pcm[offset : offset + step]
        frames.append(
            rtc.AudioFrame(
                data=chunk,
                sample_rate=sample_rate,
                num_channels=num_channels,
                samples_per_channel=len(chunk) // (2 * num_channels),
            )
        )
    return frames


def tone_frames(
    seconds: float,
    *,
    sample_rate: int = 16000,
    freq: float = 440.0,
    amplitude: float = 0.3,
    num_channels: int = 1,
    frame_ms: int = 20,
) -> list[rtc.AudioFrame]:
    """A tone cut into `frame_ms` rtc.AudioFrames, ready for `stream.push_frame`."""
    pcm = tone_pcm16(
        seconds, sample_rate=sample_rate, freq=freq, amplitude=amplitude, num_channels=num_channels
    )
    return _split_frames(pcm, sample_rate=sample_rate, num_channels=num_channels, frame_ms=frame_ms)


def silence_frames(
    seconds: float, *, sample_rate: int = 16000, num_channels: int = 1, frame_ms: int = 20
) -> list[rtc.AudioFrame]:
    """Silence cut into `frame_ms` rtc.AudioFrames (ends an utterance on the stand-in)."""
    pcm = silence_pcm16(seconds, sample_rate=sample_rate, num_channels=num_channels)
    return _split_frames(pcm, sample_rate=sample_rate, num_channels=num_channels, frame_ms=frame_ms)
