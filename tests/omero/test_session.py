"""OmeroSession: credentials, closing, groups, keep-alive, one reconnect — against the autospecced gateway."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("omero", reason="omero-py is not installed: the OMERO suite runs on Python 3.10 (.ci/omero-suite.sh)")

import Ice  # noqa: E402
import omero  # noqa: E402

from lpfm_toolkit.errors import ConnectionFailedError  # noqa: E402
from lpfm_toolkit.integrations.omero.session import (  # noqa: E402
    OmeroPermissionError,
    OmeroSession,
    OmeroSettings,
    SessionLostError,
)


def test_settings_layers_flags_over_env_over_settings_file() -> None:
    file_settings = SimpleNamespace(omero_host="file-host", omero_port=4064, omero_user="file-user",
                                    omero_group=None, omero_secure=True)
    env = {"OMERO_HOST": "env-host", "OMERO_PASSWORD": "pw", "OMERO_SECURE": "false"}
    s = OmeroSettings.resolve(user="flag-user", settings=file_settings, env=env)
    assert (s.host, s.user, s.password, s.secure, s.port) == ("env-host", "flag-user", "pw", False, 4064)
    s = OmeroSettings.resolve(host="flag-host", settings=file_settings, env={})
    assert (s.host, s.user, s.secure) == ("flag-host", "file-user", True)
    assert "pw" not in repr(OmeroSettings(host="h", user="u", password="pw", session_key="k"))
    assert "k'" not in repr(OmeroSettings(host="h", session_key="k"))


def test_settings_refuse_to_connect_without_host_or_credentials() -> None:
    with pytest.raises(ConnectionFailedError, match="no OMERO server"):
        OmeroSettings(user="u", password="p").check()
    with pytest.raises(ConnectionFailedError, match="OMERO_PASSWORD"):
        OmeroSettings(host="h", user="u").check()
    OmeroSettings(host="h", session_key="abc").check()


def test_password_login_closes_hard(server, settings) -> None:
    with OmeroSession(settings) as s:
        assert s.conn is not None
    gw = server.gateways[0]
    assert gw.connected and gw.closed is True  # our own session: killed on exit
    assert s.conn is None


def test_session_key_joins_and_detaches(server) -> None:
    with OmeroSession(OmeroSettings(host="h", session_key="session-key-1")):
        pass
    gw = server.gateways[0]
    gw.conn.connect.assert_called_once_with(sUuid="session-key-1")
    assert gw.closed is False  # a joined session is someone else's: detach, never kill


def test_wrong_password_and_expired_key_are_clear_errors(server) -> None:
    with pytest.raises(ConnectionFailedError, match="login as 'alice' was refused"):
        OmeroSession(OmeroSettings(host="h", user="alice", password="wrong")).open()
    with pytest.raises(ConnectionFailedError, match="session key is not valid"):
        OmeroSession(OmeroSettings(host="h", session_key="expired")).open()


def test_group_is_switched_and_restored_even_after_an_error(server, settings) -> None:
    conn = server.make_gateway(settings)
    conn.connect()
    conn.SERVICE_OPTS.setOmeroGroup(3)
    with pytest.raises(RuntimeError), OmeroSession(conn=conn) as s:
        s.switch_group("other-lab")
        assert conn.SERVICE_OPTS.getOmeroGroup() == "5"
        raise RuntimeError("boom")
    assert conn.SERVICE_OPTS.getOmeroGroup() == "3"
    assert server.gateways[0].closed is None  # a gateway handed in is never closed by us


def test_group_not_a_member_is_refused(server, settings) -> None:
    with OmeroSession(settings) as s, pytest.raises(OmeroPermissionError, match="not a member"):
        s.switch_group(77)


def test_keepalive_pings_while_active_and_stops(server, settings) -> None:
    with OmeroSession(settings, keepalive_seconds=0.02) as s:
        with s.keepalive():
            time.sleep(0.15)
        seen = server.keepalives
        assert seen >= 2
        time.sleep(0.08)
        assert server.keepalives == seen


def test_call_reconnects_once_then_gives_a_clear_error(server, settings) -> None:
    with OmeroSession(settings) as s:
        server.inject("getMaxPlaneSize", Ice.ConnectionLostException())
        assert s.call(lambda c: c.getMaxPlaneSize(), "read limits") == (3192, 3192)
        assert len(server.gateways) == 2 and s.reconnects == 1
        server.inject("getMaxPlaneSize", Ice.ConnectionLostException(), times=2)
        with pytest.raises(SessionLostError, match="read limits"):
            s.call(lambda c: c.getMaxPlaneSize(), "read limits")


def test_expired_session_key_cannot_be_resumed(server) -> None:
    with OmeroSession(OmeroSettings(host="h", session_key="session-key-1")) as s:
        server.valid_session_keys.clear()  # the server expired it
        server.inject("getMaxPlaneSize", omero.SessionTimeoutException())
        with pytest.raises(SessionLostError, match="reconnecting failed"):
            s.call(lambda c: c.getMaxPlaneSize(), "read limits")


def test_permission_denied_is_a_permission_error(server, settings) -> None:
    with OmeroSession(settings) as s:
        server.inject("getMaxPlaneSize", omero.SecurityViolation(None, None, "no"))
        with pytest.raises(PermissionError, match="OMERO refused to read limits"):
            s.call(lambda c: c.getMaxPlaneSize(), "read limits")


def test_secrets_never_reach_the_log(server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with OmeroSession(OmeroSettings(host="h", user="alice", password="s3cret")) as s:
        server.inject("getMaxPlaneSize", Ice.ConnectionLostException())
        s.call(lambda c: c.getMaxPlaneSize(), "read limits")
    with OmeroSession(OmeroSettings(host="h", session_key="session-key-1")):
        pass
    assert "s3cret" not in caplog.text and "session-key-1" not in caplog.text
    assert "reconnecting" in caplog.text
