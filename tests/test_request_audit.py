"""The request audit: a hash-chained record per request, tamper evidence, rotation, sinks.

Real files, the real ``appliance requests --check`` command, a real UNIX datagram socket as
the syslog daemon, and a real ``serve`` of a tiny generated model asked by the official
``openai`` client.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import appliance, assert_error, ok
from server_helpers import (
    MODEL_ID,
    TEST_KEY_NAME,
    chat_messages,
    live_server,
    load_model,
    requires_llama,
    wait_for,
    write_model,
)

from appliance.chain import GENESIS
from appliance.server.holder import ModelHolder
from appliance.server.requestlog import RequestLog, check_log
from signing.errors import IntegrityError, StateError

GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 1}


def write_records(path: Path, count: int, **kwargs: Any) -> RequestLog:
    log = RequestLog(path, **kwargs)
    log.open()
    for n in range(count):
        log.write({"time": "2026-12-03T00:00:00.000Z", "key": "alice", "n": n, "latency_ms": 1})
    log.close()
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- the chain and tampering -------------------------------------------------------------------


def test_records_chain_and_check(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    write_records(path, 5)
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] != GENESIS
    # a restart goes on with the chain
    write_records(path, 2)
    assert check_log(path).records == 7
    result = ok(appliance(tmp_path, "requests", "--check"))
    assert "7 records" in result.out


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "delete-last"])
def test_tampering_is_found_with_its_line(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "requests.jsonl"
    write_records(path, 6)
    lines = lines_of(path)
    if tamper == "edit":
        lines[2] = lines[2].replace(b'"key":"alice"', b'"key":"mallory"')
        where = "line 4"  # line 3 was changed: line 4 no longer names its hash
    elif tamper == "delete":
        del lines[2]
        where = "line 3"
    elif tamper == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
        where = "line 3"
    else:
        del lines[-1]
        where = "records were removed from the end"
    path.write_bytes(b"".join(lines))
    with pytest.raises(IntegrityError, match=where):
        check_log(path)
    assert_error(appliance(tmp_path, "requests", "--check", "--file", path), 6, where)


def test_a_tampered_log_refuses_to_be_extended(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    write_records(path, 3)
    path.write_bytes(b"".join(lines_of(path)[:-1]))
    log = RequestLog(path)
    with pytest.raises(IntegrityError, match="records were removed from the end"):
        log.preflight()  # what serve runs before it binds a port
    with pytest.raises(IntegrityError, match="records were removed from the end"):
        log.open()
    assert len(lines_of(path)) == 2  # nothing was appended


# -- rotation ----------------------------------------------------------------------------------


def test_rotation_anchors_each_file_to_the_last(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    write_records(path, 120, max_bytes=4096)
    rotated = sorted(tmp_path.glob("requests.0*.jsonl"))
    assert len(rotated) >= 2
    for older, newer in zip([*rotated], [*rotated[1:], path], strict=True):
        last = lines_of(older)[-1].rstrip(b"\n")
        first = json.loads(lines_of(newer)[0])
        assert first["prev"] == hashlib.sha256(last).hexdigest()
        assert first["seq"] == json.loads(last)["seq"] + 1
        assert older.stat().st_size <= 4096
    report = check_log(path)
    assert (report.files, report.records, report.first_seq) == (len(rotated) + 1, 120, 1)
    # a rotated file removed from the middle breaks the chain at the next file's first line
    rotated[1].unlink()
    after = rotated[2] if len(rotated) > 2 else path
    with pytest.raises(IntegrityError, match=rf"{re.escape(after.name)} line 1: seq is"):
        check_log(path)


def test_archived_oldest_files_are_noted_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    write_records(path, 120, max_bytes=4096)
    oldest = sorted(tmp_path.glob("requests.0*.jsonl"))[0]
    kept = len(lines_of(oldest))
    oldest.unlink()
    result = ok(appliance(tmp_path, "requests", "--check"))
    assert f"starts at record {kept + 1}" in result.out


# -- sinks -------------------------------------------------------------------------------------


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A real syslog daemon's socket: a UNIX datagram socket we read."""
    address = tmp_path / "log.sock"
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(address))
    daemon.settimeout(5)
    yield address, daemon
    daemon.close()


def test_every_sink_gets_the_same_record(
    tmp_path: Path, syslog_socket: tuple[Path, socket.socket]
) -> None:
    address, daemon = syslog_socket
    path = tmp_path / "requests.jsonl"
    code = (
        "import sys; from pathlib import Path; from appliance.server.requestlog import RequestLog;"
        f"log = RequestLog(Path({str(path)!r}), sinks=('file', 'stdout', 'syslog'),"
        f" syslog_address=Path({str(address)!r})); log.open();"
        "[log.write({'key': 'alice', 'n': n}) for n in range(3)]; log.close()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    in_file = [line.rstrip(b"\n") for line in lines_of(path)]
    on_stdout = done.stdout.splitlines()
    from_syslog = [daemon.recv(65536) for _ in range(3)]
    assert len(in_file) == 3
    assert on_stdout == in_file
    for message, line in zip(from_syslog, in_file, strict=True):
        assert message.startswith(b"<134>appliance-requests: ")  # local0.info
        assert message.removeprefix(b"<134>appliance-requests: ").rstrip(b"\x00") == line


def test_a_missing_syslog_socket_is_refused_at_start(tmp_path: Path) -> None:
    log = RequestLog(
        tmp_path / "r.jsonl", sinks=("syslog",), syslog_address=tmp_path / "no-such-socket"
    )
    with pytest.raises(Exception, match="no-such-socket does not exist"):
        log.open()


# -- a real serve --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHolder]:
    base = tmp_path_factory.mktemp("audit")
    held = ModelHolder(load_model(write_model(base / "tiny.gguf"), parallel=1))
    yield held
    held.close()


@requires_llama
def test_serve_records_every_request_in_a_chain(tmp_path: Path, holder: ModelHolder) -> None:
    with live_server(tmp_path / "root", holder, max_concurrency=1) as live:
        client = live.client()
        client.chat.completions.create(
            model=MODEL_ID, messages=chat_messages("mail me at bob@example.org"), max_tokens=2,
            **GREEDY,
        )  # fmt: skip
        client.completions.create(model=MODEL_ID, prompt="hello", max_tokens=2, **GREEDY)
        with live.http(key="wrong") as http:
            assert http.get("/v1/models").status_code == 401
    records = live.log_entries()
    chat = next(r for r in records if r["route"] == "/v1/chat/completions")
    assert chat["key"] == TEST_KEY_NAME
    assert chat["model"] == MODEL_ID
    assert chat["status"] == 200
    assert chat["prompt_tokens"] > 0
    assert 0 < chat["completion_tokens"] <= 2
    assert isinstance(chat["latency_ms"], int)
    assert "prompt" not in chat  # log_prompts is off
    assert any(r["status"] == 401 for r in records)
    assert "bob@example.org" not in (tmp_path / "root" / "requests.jsonl").read_text()
    result = ok(appliance(tmp_path / "root", "requests", "--check"))
    assert f"{len(records)} records" in result.out


@requires_llama
def test_serve_logs_prompts_only_masked(tmp_path: Path, holder: ModelHolder) -> None:
    with live_server(tmp_path / "root", holder, max_concurrency=1, log_prompts=True) as live:
        client = live.client()
        whole = client.chat.completions.create(
            model=MODEL_ID,
            messages=chat_messages("card 4111 1111 1111 1111, mail bob@example.org"),
            max_tokens=3,
            **GREEDY,
        )
        entry = live.last_entry("/v1/chat/completions")
        stream = client.completions.create(
            model=MODEL_ID, prompt="call +1 415 555 2671", max_tokens=3, stream=True, **GREEDY
        )
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        # the record is written when the stream has ended, just after the client's [DONE]
        wait_for(
            lambda: any(e["route"] == "/v1/completions" for e in live.log_entries()),
            what="the streamed request's record",
        )
        streamed_entry = live.last_entry("/v1/completions")
    assert entry["prompt"] == chat_messages("card <CREDIT_CARD>, mail <EMAIL_ADDRESS>")
    # the answers' text too (the tiny model's words hold no PII: logged as they were)
    assert entry["response"] == whole.choices[0].message.content
    assert streamed_entry["prompt"] == "call <PHONE_NUMBER>"
    assert streamed_entry["response"] == streamed
    text = (tmp_path / "root" / "requests.jsonl").read_text()
    assert "4111" not in text
    assert "bob@example.org" not in text
    ok(appliance(tmp_path / "root", "requests", "--check"))


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    first = RequestLog(tmp_path / "requests.jsonl")
    first.open()
    try:
        with pytest.raises(StateError, match="in use by another 'serve'"):
            RequestLog(tmp_path / "requests.jsonl").open()
    finally:
        first.close()
    write_records(tmp_path / "requests.jsonl", 1)  # free again once closed


def test_text_that_cannot_be_encoded_is_dropped_not_the_record(tmp_path: Path) -> None:
    nested: Any = "deep"
    for _ in range(100):
        nested = [nested]
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path)
    log.open()
    log.write({"key": "alice", "status": 200, "prompt": nested})
    log.close()
    (record,) = [json.loads(line) for line in lines_of(path)]
    assert record["status"] == 200
    assert "prompt" not in record
    assert "nested deeper" in record["text_dropped"]
    assert check_log(path).records == 1


@requires_llama
def test_serve_sends_the_same_masked_record_to_every_sink(
    tmp_path: Path, holder: ModelHolder, syslog_socket: tuple[Path, socket.socket]
) -> None:
    address, daemon = syslog_socket
    root = tmp_path / "root"
    with live_server(
        root,
        holder,
        max_concurrency=1,
        log_prompts=True,
        request_log_sinks="file,syslog",
        syslog_socket=address,
    ) as live:
        live.client().completions.create(
            model=MODEL_ID, prompt="iban GB82WEST12345698765432", max_tokens=2, **GREEDY
        )
    in_file = [line.rstrip(b"\n") for line in lines_of(root / "requests.jsonl")]
    from_syslog = [daemon.recv(65536) for _ in in_file]
    assert [m.split(b": ", 1)[1].rstrip(b"\x00") for m in from_syslog] == in_file
    (record,) = [json.loads(line) for line in in_file if b"/v1/completions" in line]
    assert record["prompt"] == "iban <IBAN_CODE>"
    assert b"GB82" not in b"".join(from_syslog)
