"""The downstream transaction (`relay.RelaySession`) against a real aiosmtpd sink on 127.0.0.1,
and the log formatters that write the per-message line."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from spamfilterd.logformat import JsonFormatter, LogfmtFormatter
from spamfilterd.relay import Downstream, DownstreamError, Relay, RelaySession
from tests.helpers import Sink, make_message, split


@pytest.fixture
def sink(lt):
    sink = Sink(lt).start()
    yield sink
    sink.stop()


def relay_session(sink: Sink, lmtp: bool = False) -> tuple[RelaySession, Counter]:
    errors: Counter = Counter()
    relay = Relay(lambda: Downstream("127.0.0.1", sink.port, "proxy.test", 5), errors)
    return RelaySession(relay, lmtp), errors


def test_open_start_deliver_reuses_one_connection(lt, sink):
    session, errors = relay_session(sink)

    async def two_messages():
        replies = []
        for tag in ("one", "two"):
            replies.append(await session.start("alice@example.org", ["BODY=8BITMIME"]))
            replies.append(await session.rcpt("bob@example.net", ["NOTIFY=FAILURE"]))
            replies += await session.deliver(make_message(tag), 1)
        connection = session.connection
        session.quit()
        return replies, connection

    replies, connection = lt.run(two_messages())
    assert [r.code for r in replies] == [250] * 6
    assert connection is not None and connection.closed and session.connection is None
    assert [split(r.content)[1] for r in sink.received] == [split(make_message("one"))[1]] * 2
    assert sink.received[0].rcpt_tos == ["bob@example.net"]
    assert len(sink.sessions) == 1  # the second message went on the same connection
    assert session.rcpt_params == {"bob@example.net": ["NOTIFY=FAILURE"]}
    assert errors == Counter()


def test_an_abandoned_or_aborted_transaction_is_reset_before_the_next_mail(lt, sink):
    session, _ = relay_session(sink)

    async def run():
        await session.start("alice@example.org", [])
        await session.rcpt("bob@example.net", [])
        assert session.open_transaction
        abandoned = await session.start("carol@example.org", [])  # RSET first, or 503 nested MAIL
        await session.rcpt("dave@example.net", [])
        await session.abort()
        assert not session.open_transaction
        after_abort = await session.start("erin@example.org", [])
        await session.rcpt("frank@example.net", [])
        await session.deliver(make_message("kept"), 1)
        return abandoned, after_abort

    abandoned, after_abort = lt.run(run())
    assert (abandoned.code, after_abort.code) == (250, 250)
    (got,) = sink.received
    assert (got.mail_from, got.rcpt_tos) == ("erin@example.org", ["frank@example.net"])


def test_restart_opens_a_transaction_of_its_own_with_each_recipients_parameters(lt, sink):
    session, _ = relay_session(sink)
    sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"

    async def run():
        await session.start("alice@example.org", [])
        await session.rcpt("bob@example.net", ["NOTIFY=NEVER"])
        answers = await session.restart(
            "alice@example.org", [], [("bob@example.net", ["NOTIFY=NEVER"]), ("nobody@example.net", [])]
        )
        return answers, await session.deliver(make_message("group"), 1)

    answers, delivered = lt.run(run())
    assert [a.code for a in answers] == [250, 250, 550]
    assert delivered[0].code == 250
    assert sink.handler.commands[-2:] == ["TO:<bob@example.net> NOTIFY=NEVER", "TO:<nobody@example.net>"]
    assert sink.received[0].rcpt_tos == ["bob@example.net"]


def test_a_lost_downstream_is_dropped_counted_and_replaced_by_the_next_start(lt, sink):
    session, errors = relay_session(sink)
    lt.run(session.start("alice@example.org", []))
    sink.stop()
    with pytest.raises(DownstreamError):
        lt.run(session.rcpt("bob@example.net", []))
    assert session.connection is None and errors["downstream"] == 1
    with pytest.raises(DownstreamError):  # nothing to add a recipient to: not counted twice
        lt.run(session.rcpt("bob@example.net", []))
    assert errors["downstream"] == 1
    sink.start()
    assert lt.run(session.start("alice@example.org", [])).code == 250


def test_a_session_whose_client_is_gone_closes_a_late_connection(lt, sink):
    session, errors = relay_session(sink)
    session.close()
    with pytest.raises(DownstreamError, match="hung up"):
        lt.run(session.start("alice@example.org", []))
    assert session.connection is None and errors["downstream"] == 1


def _message_record(**fields) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": "spamfilterd.smtp", "levelname": "INFO", "levelno": logging.INFO, "msg": "message delivered"}
    )
    record.fields = fields
    return record


def test_the_text_log_line_is_logfmt_and_leaves_the_record_alone():
    record = _message_record(message_id="<a b@c>", rcpts=2, reply="250-a\r\n250 b", model=None)
    line = LogfmtFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == 'INFO spamfilterd.smtp: message_id="<a b@c>" rcpts=2 reply="250-a 250 b" model=""'
    assert record.getMessage() == "message delivered"  # other handlers see the record unchanged
    plain = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "hello %s", "args": ("you",)})
    assert LogfmtFormatter("%(message)s").format(plain) == "hello you"


def test_the_json_log_line_has_the_fields_as_keys():
    entry = json.loads(JsonFormatter().format(_message_record(message_id="<a@b>", rcpts=2)))
    assert (entry["logger"], entry["message_id"], entry["rcpts"]) == ("spamfilterd.smtp", "<a@b>", 2)
    assert "msg" not in entry
