"""Dependency internals the product relies on are still there, as the pinned version had them.

Where a dependency offers no public way, the product uses an internal and
``pyproject.toml`` pins the exact version it was written for. An upgrade that
moved one of them would otherwise fail silently (an override that no longer
overrides anything), so each is checked here by name and signature, with a
message naming the file that relies on it and what to do.

Today: amqtt, for ``server/embedded_broker.py`` (see its module docstring):
two overrides/replaced attributes, and a few behaviours its limits rely on.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import re
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import Session

from edgeota.server.embedded_broker import AMQTT_ATTRIBUTES, AMQTT_OVERRIDES

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
WHO = "server/embedded_broker.py"


def pinned(distribution: str) -> str:
    """The exact version ``pyproject.toml`` pins ``distribution`` to (``name==X``)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(distribution)}==([\w.]+)", requirement.strip())
        if match:
            return match[1]
    raise AssertionError(f"pyproject.toml no longer pins {distribution} exactly, but {WHO} "
                         f"relies on its internals {AMQTT_OVERRIDES + AMQTT_ATTRIBUTES}: pin "
                         "the version they were checked against")


def moved(what: str) -> str:
    return (f"amqtt {metadata.version('amqtt')}: {what}. {WHO} relies on it (no public way in "
            f"amqtt {pinned('amqtt')}); read the new amqtt source, adapt {WHO}, then this test "
            "and the pin in pyproject.toml")


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A plain amqtt broker, made but never started (nothing listens)."""
    loop = asyncio.new_event_loop()
    try:
        yield Broker({"listeners": {"default": {"type": "external"}}, "plugins": {}}, loop=loop)
    finally:
        loop.close()


def test_the_installed_amqtt_is_the_pinned_one() -> None:
    installed, wanted = metadata.version("amqtt"), pinned("amqtt")
    assert installed == wanted, (
        f"amqtt {installed} is installed, {WHO} was written for {wanted} (pyproject.toml): it "
        f"overrides {AMQTT_OVERRIDES} and replaces {AMQTT_ATTRIBUTES} of amqtt.broker.Broker; "
        "check them against the new version before moving the pin")


def test_the_overridden_retained_message_hook_is_there_and_still_called() -> None:
    name = "_publish_retained_messages_for_subscription"
    assert name in AMQTT_OVERRIDES
    method = getattr(Broker, name, None)
    assert method is not None, moved(f"Broker.{name} is gone")
    assert inspect.iscoroutinefunction(method), moved(f"Broker.{name} is no longer a coroutine")
    assert list(inspect.signature(method).parameters) == ["self", "subscription", "session"], \
        moved(f"Broker.{name} now takes {inspect.signature(method)}")
    # Where amqtt sends retained messages: on SUBSCRIBE, and at connect for every filter.
    for caller in ("_handle_subscription", "_handle_client_session"):
        source = inspect.getsource(getattr(Broker, caller))
        assert f"self.{name}(" in source, moved(
            f"Broker.{caller} no longer sends retained messages through Broker.{name}: "
            "the override (the RECEIVE check on retained messages) would not apply")


def test_the_replaced_subscription_table_is_what_the_broker_iterates(broker: Broker) -> None:
    assert AMQTT_ATTRIBUTES == ("_subscriptions", "_tasks_queue")
    table = vars(broker).get("_subscriptions")
    assert isinstance(table, dict), moved("a Broker has no _subscriptions dict any more")
    assert broker.subscriptions is table, moved(
        "Broker.subscriptions no longer returns Broker._subscriptions")
    for method in ("_run_broadcast", "_handle_client_session", "add_subscription"):
        assert "self._subscriptions" in inspect.getsource(getattr(Broker, method)), moved(
            f"Broker.{method} no longer uses self._subscriptions")


def test_the_replaced_delivery_task_list_is_what_the_broadcast_fills(broker: Broker) -> None:
    """``_RunningDeliveries`` replaces it: finished deliveries must leave it, not pile up."""
    tasks = vars(broker).get("_tasks_queue")
    assert isinstance(tasks, collections.deque) and not tasks, moved(
        "a Broker has no empty _tasks_queue deque any more")
    assert "running_tasks.append(" in inspect.getsource(Broker._run_broadcast), moved(
        "Broker._run_broadcast no longer appends its delivery tasks to the list it is given")
    assert "self._tasks_queue" in inspect.getsource(Broker._broadcast_loop), moved(
        "Broker._broadcast_loop no longer runs the broadcast with self._tasks_queue")


def test_the_connect_is_read_after_the_hand_over_and_sessions_dropped_before_auth() -> None:
    """Why the CONNECT is checked before ``external_connected``: amqtt drops first, asks later.

    If an upgrade authenticated before dropping a clean session's
    predecessor, the check would still be right, only no longer the sole
    guard; this test then says so, so the docstring can be corrected.
    """
    source = inspect.getsource(Broker._initialize_client_session)
    assert "init_from_connect" in source and "self._delete_session(" in source, moved(
        "Broker._initialize_client_session no longer reads the CONNECT and drops the old session")
    assert "_authenticate" not in source, moved(
        "Broker._initialize_client_session now authenticates before dropping the old session")


def test_what_the_queue_bound_counts_is_recorded_before_the_write() -> None:
    """``CertificateAclPlugin`` counts ``Session.inflight_out`` as "queued to this client"."""
    assert isinstance(getattr(Session, "inflight_out_count", None), property), moved(
        "Session.inflight_out_count is gone")
    assert hasattr(Session(), "retained_messages"), moved("Session.retained_messages is gone")
    source = inspect.getsource(ProtocolHandler._handle_qos1_message_flow)
    stored, written = source.find("self.session.inflight_out["), source.find("_send_packet(")
    assert 0 <= stored < written, moved(
        "a QoS 1 delivery is no longer in Session.inflight_out while it waits to be written")


def test_the_public_amqtt_api_the_embedded_broker_uses_is_there(broker: Broker) -> None:
    """Public, but young: checked too, so an upgrade that moves it fails here, not at start-up."""
    assert ListenerType("external") is ListenerType.EXTERNAL
    assert list(inspect.signature(Broker.external_connected).parameters) == [
        "self", "reader", "writer", "listener_name"], moved("Broker.external_connected changed")
    # The embedded broker's own reader and writer implement these, and only these.
    assert ReaderAdapter.__abstractmethods__ == {"read", "feed_eof"}, moved(
        f"ReaderAdapter now asks for {sorted(ReaderAdapter.__abstractmethods__)}")
    assert WriterAdapter.__abstractmethods__ == {
        "write", "drain", "get_peer_info", "get_ssl_info", "close"}, moved(
        f"WriterAdapter now asks for {sorted(WriterAdapter.__abstractmethods__)}")
    assert callable(getattr(broker.plugins_manager, "get_plugin", None)), moved(
        "PluginManager.get_plugin is gone (EmbeddedBroker.counters reads the ACL plugin)")
    topic_check = inspect.signature(broker.plugins_manager.map_plugin_topic)
    assert set(topic_check.parameters) == {"session", "topic", "action"}, moved(
        f"PluginManager.map_plugin_topic now takes {topic_check}")
    for prop in ("subscriptions", "retained_messages", "sessions"):
        assert isinstance(getattr(Broker, prop, None), property), moved(f"Broker.{prop} changed")
