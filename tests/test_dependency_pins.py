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
    assert AMQTT_ATTRIBUTES == ("_subscriptions", "_tasks_queue", "_broadcast_queue")
    table = vars(broker).get("_subscriptions")
    assert isinstance(table, dict), moved("a Broker has no _subscriptions dict any more")
    assert broker.subscriptions is table, moved(
        "Broker.subscriptions no longer returns Broker._subscriptions")
    for method in ("_run_broadcast", "_handle_client_session", "add_subscription"):
        assert "self._subscriptions" in inspect.getsource(getattr(Broker, method)), moved(
            f"Broker.{method} no longer uses self._subscriptions")


# The other internals AMQTT_ATTRIBUTES names: what each must be on a new Broker.
ATTRIBUTE_TYPES: dict[str, type] = {
    "_tasks_queue": collections.deque,  # replaced by _RunningDeliveries (starts empty)
    "_broadcast_queue": asyncio.Queue,  # only its length is read (the readers' backlog bound)
}

# Where amqtt does what the embedded broker's limits assume, checked in its source:
# (owner, method, text that must (True) or must not (False) be there, what it means).
SOURCE_FACTS: list[tuple[type, str, str, bool, str]] = [
    (Broker, "_run_broadcast", "running_tasks.append(", True,
     "the broadcast appends each delivery task to the list it is given (_tasks_queue)"),
    (Broker, "_broadcast_loop", "self._tasks_queue", True,
     "the broadcast loop runs with self._tasks_queue as that list"),
    (Broker, "_broadcast_message", "self._broadcast_queue.put(", True,
     "a received message waits in self._broadcast_queue to be broadcast"),
    (Broker, "_run_broadcast", "self._broadcast_queue.get()", True,
     "the broadcast takes its messages from self._broadcast_queue"),
    (Broker, "_initialize_client_session", "self._delete_session(", True,
     "a clean CONNECT drops the session holding its client id"),
    (Broker, "_initialize_client_session", "_authenticate", False,
     "... before any authentication: why the hand-over checks the CONNECT first (if this "
     "fails, amqtt now authenticates first; the check stays right, correct the docstring)"),
    (ProtocolHandler, "_handle_qos1_message_flow", "self.session.inflight_out[", True,
     "a QoS 1 delivery is in Session.inflight_out (the queue bound counts it)"),
]


def test_the_other_replaced_or_read_attributes_are_there(broker: Broker) -> None:
    assert set(ATTRIBUTE_TYPES) == set(AMQTT_ATTRIBUTES) - {"_subscriptions"}
    for name, kind in ATTRIBUTE_TYPES.items():
        value = vars(broker).get(name)
        assert isinstance(value, kind), moved(f"a Broker's {name} is no longer a {kind.__name__}")
    assert not vars(broker).get(next(iter(ATTRIBUTE_TYPES))), moved(
        "a new Broker's delivery task list is not empty")


@pytest.mark.parametrize(("owner", "method", "text", "present", "meaning"), SOURCE_FACTS,
                         ids=[f"{o.__name__}.{m}:{t}" for o, m, t, _p, _w in SOURCE_FACTS])
def test_amqtt_still_works_the_way_the_embedded_broker_limits_assume(
        owner: type, method: str, text: str, present: bool, meaning: str) -> None:
    function = getattr(owner, method, None)
    assert function is not None, moved(f"{owner.__name__}.{method} is gone")
    assert (text in inspect.getsource(function)) is present, moved(
        f"{owner.__name__}.{method} changed: the embedded broker assumes {meaning}")


def test_what_the_queue_bound_counts_is_public() -> None:
    """``CertificateAclPlugin`` reads ``Session.inflight_out_count`` and ``retained_messages``."""
    assert isinstance(getattr(Session, "inflight_out_count", None), property), moved(
        "Session.inflight_out_count is gone")
    assert hasattr(Session(), "retained_messages"), moved("Session.retained_messages is gone")


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
