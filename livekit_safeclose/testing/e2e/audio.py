"""The caller's side of an end-to-end session: real-time paced microphone frames."""

from __future__ import annotations

import asyncio
from typing import Literal

from livekit import rtc
from livekit.agents.voice import io

from ..standins import tone_pcm16

AudioMode = Literal["tone", "silence", "mute"]

SAMPLE_RATE = 16000
FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms


class ScriptedAudioInput(io.AudioInput):
    """Real-time paced 20 ms frames at 16 kHz. ``mode``: ``"tone"`` (a 440 Hz tone the
    stand-in transcribes as speech and Silero hears as voice), ``"silence"`` (a quiet
    caller: audio keeps flowing) or ``"mute"`` (no frames at all: a caller who hung up,
    which the provider's idle timeout notices)."""

    def __init__(self, mode: AudioMode = "silence") -> None:
        super().__init__(label="ScriptedAudioInput")
        self._mode: AudioMode = mode
        self._changed = asyncio.Event()
        pcm = tone_pcm16(1.0, sample_rate=SAMPLE_RATE)  # 1 s = 50 whole periods: loops seamlessly
        step = FRAME_SAMPLES * 2
        self._tone = [self._frame(pcm[i : i + step]) for i in range(0, len(pcm), step)]
        self._silence = self._frame(bytes(step))
        self._i = 0
        self._next: float | None = None

    @staticmethod
    def _frame(data: bytes) -> rtc.AudioFrame:
        return rtc.AudioFrame(
            data=data, sample_rate=SAMPLE_RATE, num_channels=1, samples_per_channel=len(data) // 2
        )

    @property
    def mode(self) -> AudioMode:
        return self._mode

    @mode.setter
    def mode(self, mode: AudioMode) -> None:
        self._mode = mode
        self._changed.set()

    async def speak(self, seconds: float, then: AudioMode = "silence") -> None:
        """Send ``seconds`` of tone, then switch to ``then``."""
        self.mode = "tone"
        await asyncio.sleep(seconds)
        self.mode = then

    async def __anext__(self) -> rtc.AudioFrame:
        while self._mode == "mute":
            self._changed.clear()
            self._next = None
            await self._changed.wait()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next = now + 0.02 if self._next is None else max(self._next + 0.02, now - 0.1)
        await asyncio.sleep(max(0.0, self._next - now))
        if self._mode == "tone":
            self._i = (self._i + 1) % len(self._tone)
            return self._tone[self._i]
        return self._silence
