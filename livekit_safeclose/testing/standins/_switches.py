"""The stand-in server's switches: what a test flips to make a provider misbehave.

Plain attributes, read by the server thread at each decision point (attribute stores are
atomic under the GIL), so they can be assigned at any time, mid-test included.
"""

from __future__ import annotations

from ._types import Kind, QuotaMode, StallMode


class Switches:
    """Every switch of :class:`~.server.ProviderServer`, with its default.

    * idle_close_after: STT connections that have received no audio for this many
      seconds (counted from the last audio frame, or from the upgrade if none;
      Deepgram KeepAlive does not count) are closed by the server: inference STT
      gets `{"type": "error", "code": 2007, "message": IDLE_CLOSE_MESSAGE}` then a
      normal close frame; Deepgram gets a 1011 close with its NET-0001 reason.
    * stt_quota / quota_mode: at most `stt_quota` open STT connections PER KIND
      (inference_stt and deepgram_stt are separate providers with separate quotas).
      "http429" refuses the upgrade with HTTP 429; "error_frame" upgrades, sends an
      error (inference: `{"type": "error", "code": 429, ...}`; Deepgram: a JSON
      `{"type": "Error", ...}`), then closes (Deepgram: close code 1008).
    * refuse_kinds: a provider outage: every websocket upgrade of these kinds is
      answered with HTTP 503 (counted in `rejected`, logged `rejected:outage`). Empty by
      default; flip it back mid-test to let the provider come back.
    * stall / stall_kinds: "no_handshake" holds the HTTP request without ever
      answering (no upgrade, no LLM response headers); "never_answer" completes the
      upgrade (LLM: sends 200 + SSE headers) and then sends no application message.
      The websocket close handshake is still answered (subject to slow_close).
      "no_close_ack" serves the protocol as usual but never answers a client's close
      frame: the socket is held until the client drops it.
      `stall_kinds=None` applies the stall to every kind.
    * slow_close: seconds to wait before acknowledging a client goodbye/close:
      before `session.closed` + close frame (inference), before the final
      `Metadata` + close (Deepgram CloseStream), before answering a bare close frame.
      Only clients that await the ack notice: the TTS pool's ws.close() and the
      Deepgram drain do; STT aclose() cancels its pending receive, after which aiohttp
      drops TCP right after its own close frame.
    * finalize_delay: seconds before answering a finalize (late final transcripts).
    * llm_first_token_delay: seconds before the first LLM chunk.
    * transcript_text, speech_min_seconds, speech_rms_threshold: start of speech is
      sent on the first voiced chunk (RMS >= threshold, 0..1 scale), interim + final
      once `speech_min_seconds` of voice accumulated; a finalize flushes shorter
      pending speech as a final. A 440 Hz tone at 0.3 amplitude (RMS ~0.21) is
      speech, digital silence is not (see SpeechDetector).
    * tts_ms_per_word: duration of synthesized audio per input word.
    * realtime_item_delay: seconds before the Realtime stand-in confirms a tool result
      (`function_call_output` item); realtime_audio_seconds: audio per spoken reply;
      realtime_refusal: an error code the Realtime stand-in answers every connection
      with, in-band, before closing it (None: serve).
    """

    def __init__(self, transcript_text: str) -> None:
        self.idle_close_after: float | None = None
        self.stt_quota: int | None = None
        self.quota_mode: QuotaMode = "http429"
        self.refuse_kinds: frozenset[Kind] = frozenset()
        self.stall: StallMode | None = None
        self.stall_kinds: frozenset[Kind] | None = None
        self.slow_close: float = 0.0
        self.finalize_delay: float = 0.0
        self.llm_first_token_delay: float = 0.0
        self.transcript_text: str = transcript_text
        self.speech_min_seconds: float = 0.5
        self.speech_rms_threshold: float = 0.02
        self.tts_ms_per_word: float = 60.0
        self.realtime_item_delay: float = 0.0
        self.realtime_audio_seconds: float = 0.2
        self.realtime_refusal: str | None = None
