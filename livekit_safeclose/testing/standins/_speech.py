"""Energy-based utterance detection shared by the inference and Deepgram STT stand-ins.

The stand-ins do not recognise anything: they only decide *when* a transcript of a
fixed text is due, so tests can make "the user spoke" happen by pushing a tone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audio import pcm16_rms


@dataclass(frozen=True)
class Utterance:
    """One transcript-worthy stretch of audio, in seconds from the connection's first sample."""

    start: float
    end: float
    text: str

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    def words(self) -> list[tuple[str, float, float]]:
        """The text's words spread evenly over the utterance, as (word, start, end)."""
        parts = self.text.split()
        if not parts:
            return []
        step = self.duration / len(parts)
        return [(w, self.start + i * step, self.start + (i + 1) * step) for i, w in enumerate(parts)]


class SpeechDetector:
    """Turns PCM chunks into "utterance due" decisions.

    Voiced audio (chunk RMS >= threshold) accumulates per utterance. Once it reaches
    `min_speech` seconds an utterance is due (reported once); the next unvoiced chunk
    ends that utterance so a later tone starts a new one. Voiced audio that has not
    reached `min_speech` yet stays pending until more voice arrives or a finalize
    flushes it, which is how a provider treats a short blip before an endpoint.
    """

    def __init__(self, *, sample_rate: int, num_channels: int = 1) -> None:
        self.sample_rate = max(1, sample_rate)
        self.num_channels = max(1, num_channels)
        self.audio_seconds = 0.0
        self._voiced = 0.0
        self._start: float | None = None
        self._reported = False

    def feed(
        self, pcm: bytes, *, rms_threshold: float, min_speech: float, text: str
    ) -> tuple[float | None, Utterance | None]:
        """Account for one chunk.

        Returns (start, due): `start` is the utterance's start time when this chunk
        opened a new utterance (the moment to report start of speech), `due` is the
        utterance when it just reached `min_speech` (the moment to report transcripts).
        """
        duration = len(pcm) / (2 * self.num_channels * self.sample_rate)
        chunk_start = self.audio_seconds
        self.audio_seconds += duration
        started: float | None = None
        due: Utterance | None = None
        if pcm16_rms(pcm) >= rms_threshold:
            if self._start is None:
                self._start = started = chunk_start
            self._voiced += duration
            if not self._reported and self._voiced >= min_speech:
                self._reported = True
                due = Utterance(start=self._start, end=self.audio_seconds, text=text)
        elif self._reported:
            self._reset()
        return started, due

    def finalize(self, *, text: str) -> Utterance | None:
        """Flush pending (unreported) voiced audio as an utterance and start afresh."""
        pending = self._start is not None and not self._reported and self._voiced > 0
        utterance = (
            Utterance(start=self._start or 0.0, end=self.audio_seconds, text=text) if pending else None
        )
        self._reset()
        return utterance

    @property
    def has_pending(self) -> bool:
        return self._start is not None and not self._reported

    def _reset(self) -> None:
        self._voiced = 0.0
        self._start = None
        self._reported = False
