"""PII masking of prompts and logged text, fail-closed (docs/adr/0017-pii-masking.md).

Recognisers are Microsoft Presidio's pattern recognisers, run one by one with no NLP engine
and no model (nothing is downloaded, nothing leaves the host): payment cards (Luhn), IBAN
(mod 97), e-mail, phone numbers (libphonenumber), US SSN, and, ours on Presidio's
``PatternRecognizer``, the Chinese resident identity number (ISO 7064 MOD 11-2). Each span
found is replaced by ``<ENTITY_TYPE>`` by Presidio's anonymizer.

Fail-closed: anything that goes wrong while masking raises :class:`MaskingFailedError` (a
503 in the OpenAI shape), so that a request is refused rather than passed on raw. That
includes a failure Presidio itself swallows: a pattern whose regex runs out of time is
skipped with a warning (fail-open), which we turn back into an error.

A policy, globally or per API key, says what is masked: ``off``; ``log`` (the text written
to the request log, with ``log_prompts``); ``model`` (prompts before they reach the model);
``both``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from appliance.server.errors import APIError
from signing.errors import StateError

if TYPE_CHECKING:
    from appliance.server.deps import AppState
    from appliance.server.record import RequestRecord

log = logging.getLogger(__name__)

# Results under this score are not masked: Presidio's "very weak" patterns (any 9 digits as
# an SSN at 0.05) would mask every order number; a checksum-validated match scores 1.0.
MIN_SCORE: Final = 0.4
PHONE_REGIONS: Final = ("US", "CN")  # "+" numbers of every country are found with any region
WITHHELD: Final = "<withheld: masking failed>"
_ENTITY_FIELDS: Final = frozenset({"content", "text", "prompt", "system", "arguments"})


class MaskingFailedError(APIError):
    """The masker failed: the request is refused, never passed on unmasked."""

    status = 503
    type = "server_error"
    code = "masking_failed"


def masks_log(policy: str) -> bool:
    return policy in ("log", "both")


def masks_model(policy: str) -> bool:
    return policy in ("model", "both")


def iso7064_mod11_2(number: str) -> bool:
    """Whether an 18-character Chinese resident ID's last character is its checksum."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    if len(number) != 18 or not number[:17].isascii() or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], weights, strict=True))
    return "10X98765432"[total % 11] == number[17].upper()


class _SkipWatch(logging.Handler):
    """Catches Presidio's "pattern timed out, skipping" warnings in the thread masking now."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self.local, "active", False):
            self.local.skipped = record.getMessage()


class Masker:
    """Masks text with a fixed set of Presidio recognisers; raises MaskingFailedError."""

    ENTITIES: ClassVar[tuple[str, ...]] = (
        "CREDIT_CARD",
        "IBAN_CODE",
        "EMAIL_ADDRESS",
        "PHONE_NUMBER",
        "US_SSN",
        "CN_RESIDENT_ID",
    )

    def __init__(self, *, phone_regions: Iterable[str] = PHONE_REGIONS) -> None:
        """Build the recognisers; MaskingFailedError if Presidio cannot be used here."""
        try:
            self._recognizers, self._anonymize = _presidio(tuple(phone_regions))
        except (ImportError, ValueError, OSError) as exc:
            raise MaskingFailedError(f"PII masking is not available: {exc}") from None
        self._watch = _SkipWatch()
        presidio_log = logging.getLogger("presidio-analyzer")
        if presidio_log.getEffectiveLevel() > logging.WARNING:  # its warnings are our signal
            presidio_log.setLevel(logging.WARNING)
        presidio_log.addHandler(self._watch)

    def mask(self, text: str) -> str:
        if not text:
            return text
        local = self._watch.local
        local.active, local.skipped = True, None
        try:
            results: list[Any] = []
            for recognizer in self._recognizers:
                found = recognizer.analyze(text, recognizer.supported_entities, None)
                results.extend(r for r in found if r.score >= MIN_SCORE)
            masked = self._anonymize(text, results) if results else text
        except Exception as exc:  # noqa: BLE001 (fail closed: whatever it was, refuse)
            log.error("PII masking failed: %s: %s", type(exc).__name__, exc)  # noqa: TRY400
            raise MaskingFailedError(
                "PII masking failed on this request, so it was refused; the server log says why"
            ) from None
        finally:
            local.active = False
        if local.skipped is not None:
            log.error("PII masking failed: %s", local.skipped)
            raise MaskingFailedError(
                "PII masking could not finish on this request (a recogniser timed out), so it "
                "was refused"
            )
        return masked

    def mask_value(self, value: Any, *, text: bool = True) -> Any:
        """``value`` with the text a user wrote masked: a string, the strings of a list, and in
        objects (messages, content parts, tool calls) the strings under ``content``, ``text``,
        ``prompt``, ``system`` and ``arguments``, however deep. Other strings (roles, names,
        images as base64) are left as they are."""
        if isinstance(value, str):
            return self.mask(value) if text else value
        if isinstance(value, list):
            return [self.mask_value(item, text=text) for item in value]
        if isinstance(value, dict):
            return {k: self.mask_value(v, text=k in _ENTITY_FIELDS) for k, v in value.items()}
        return value

    def mask_payload(self, payload: dict[str, Any]) -> None:
        """Mask an engine request body in place: its messages and its prompt."""
        if "messages" in payload:
            payload["messages"] = self.mask_value(payload["messages"])
        if isinstance(payload.get("prompt"), str | list):
            payload["prompt"] = self.mask_value(payload["prompt"])

    def close(self) -> None:
        logging.getLogger("presidio-analyzer").removeHandler(self._watch)


class MaskingPolicy:
    """The policy of each request: the one of its API key, else the global one."""

    def __init__(self, default: str, per_key: Mapping[str, str]) -> None:
        self.default = default
        self.per_key = dict(per_key)

    def of(self, key_name: str | None) -> str:
        if key_name is not None and key_name in self.per_key:
            return self.per_key[key_name]
        return self.default

    def any(self, *, log_prompts: bool) -> bool:
        """Whether any request can need the masker (so that serve builds it at start)."""
        policies = {self.default, *self.per_key.values()}
        return any(masks_model(p) or (log_prompts and masks_log(p)) for p in policies)


def build_masker(policy: MaskingPolicy, *, log_prompts: bool) -> Masker | None:
    """The server's masker, or None when no request can need one; StateError (serve refuses
    to start) when one is needed and cannot be built: never a server that cannot mask."""
    if not policy.any(log_prompts=log_prompts):
        return None
    try:
        return Masker()
    except MaskingFailedError as exc:
        raise StateError(f"{exc}; install airgap-appliance[mask] or set masking = 'off'") from None


def mask_for_model(state: AppState, record: RequestRecord, payload: dict[str, Any]) -> None:
    """Mask an engine payload in place when the caller's policy says so (MaskingFailedError:
    the request is refused before the model sees it)."""
    if masks_model(state.masking.of(record.key_name)):
        _masker(state).mask_payload(payload)


def mask_texts_for_model(state: AppState, record: RequestRecord, texts: list[str]) -> list[str]:
    """Embedding inputs as the model may see them under the caller's policy."""
    if masks_model(state.masking.of(record.key_name)):
        masker = _masker(state)
        return [masker.mask(t) for t in texts]
    return texts


def refuse_unmasked_model_input(state: AppState, record: RequestRecord) -> None:
    """For a path that cannot mask what the model sees (the in-process backends take the
    prompt before it could be masked): refuse rather than pass it on raw."""
    if masks_model(state.masking.of(record.key_name)):
        raise MaskingFailedError(
            "masking prompts before the model needs the llama.cpp engine; request refused"
        )


def mask_for_log(state: AppState, record: RequestRecord, text: Any) -> Any:
    """``text`` as the request log may hold it: masked, for a caller whose policy masks the
    log (settings allow log_prompts with no other policy)."""
    if masks_log(state.masking.of(record.key_name)):
        return _masker(state).mask_value(text)
    return text


def note_response(state: AppState, record: RequestRecord, text: str) -> None:
    """The answer's text into the record, masked, when the operator logs prompts. The answer
    has gone (or is going) to the client by now: a masker that fails here keeps the text out
    of the log instead of refusing."""
    if not state.settings.log_prompts:
        return
    try:
        record.response = mask_for_log(state, record, text)
    except MaskingFailedError:
        record.response = WITHHELD


def _masker(state: AppState) -> Masker:
    if state.masker is None:  # a policy that needs one always has one (build_masker)
        raise MaskingFailedError("PII masking is not set up on this server; request refused")
    return state.masker


def _presidio(phone_regions: tuple[str, ...]) -> tuple[list[Any], Any]:
    """Presidio's recognisers and an anonymize function; imported here, on first use, since
    Presidio brings spaCy (seconds of import time that a server without masking never pays)."""
    import tldextract  # noqa: PLC0415
    from presidio_analyzer import Pattern, PatternRecognizer  # noqa: PLC0415
    from presidio_analyzer.predefined_recognizers import (  # noqa: PLC0415
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    from presidio_anonymizer import AnonymizerEngine  # noqa: PLC0415
    from presidio_anonymizer.entities import OperatorConfig, RecognizerResult  # noqa: PLC0415

    # Presidio checks an e-mail's domain with tldextract, which by default fetches the public
    # suffix list from the internet: here only the snapshot in the wheel is used.
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(offline(pattern_text).fqdn)

    class CnResidentIdRecognizer(PatternRecognizer):
        """The 18-character resident identity number: region, birth date, sequence, checksum."""

        PATTERN = (
            r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])"
            r"(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])"
        )

        def __init__(self) -> None:
            super().__init__(
                supported_entity="CN_RESIDENT_ID",
                patterns=[Pattern("CN resident ID", self.PATTERN, 0.3)],
                context=["身份证", "identity", "ID"],
            )

        def validate_result(self, pattern_text: str) -> bool:
            return iso7064_mod11_2(pattern_text)

    recognizers = [
        CreditCardRecognizer(),
        IbanRecognizer(),
        OfflineEmailRecognizer(),
        PhoneRecognizer(supported_regions=phone_regions),
        UsSsnRecognizer(),
        CnResidentIdRecognizer(),
    ]
    engine = AnonymizerEngine()  # type: ignore[no-untyped-call]
    operators = {"DEFAULT": OperatorConfig("replace")}

    def anonymize(text: str, results: list[Any]) -> str:
        found = [RecognizerResult(r.entity_type, r.start, r.end, r.score) for r in results]
        return str(engine.anonymize(text, found, operators).text)

    return recognizers, anonymize
