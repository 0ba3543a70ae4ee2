"""Two server replicas on one external Mosquitto share the devices' MQTT traffic.

Each replica runs the real MQTT transport (``edgeota serve --broker``'s code
path) against one database and one blob store. They must not knock each other
off the broker (a client id each), and every fetch request and every device
report must reach exactly one of them (a shared subscription): a report ingested
twice would be rejected the second time as a replay and pollute the audit log.
Runs on SQLite and PostgreSQL, with a real agent updating over MQTT.
"""

from __future__ import annotations

import json
from pathlib import Path

from mqtt_fleet_support import running_fleet_mosquitto
from server_support import RunningServer, running_server, wait_for
from sqlalchemy import select

from edgeota.agent.config import AgentConfig
from edgeota.agent.runner import Agent, AgentSettings
from edgeota.server.db.models import AuditEntry
from edgeota.server.embedded import EmbeddedServer, bind_loopback
from edgeota.server.fleet_ca import FleetCA
from edgeota.server.transport import MqttTransport

WAIT = 30.0  # seconds: the bound on every wait for something that must happen


def test_replicas_split_fetches_and_ingest_each_report_once(tmp_path: Path,
                                                            db_url: str) -> None:
    with running_server(tmp_path, db_url) as first, running_fleet_mosquitto(
            FleetCA.load(first.config.ca_dir), tmp_path / "mosquitto") as broker:
        second = EmbeddedServer(first.config, bind_loopback())
        second.start()
        transports: list[MqttTransport] = []
        agent = None
        try:
            for replica in (first.ctx, second.ctx):
                transport = MqttTransport(first.config.ca_dir, replica.store,
                                          broker_url=f"mqtts://127.0.0.1:{broker.server_port}",
                                          sessions=replica.sessions, clock=replica.clock)
                transport.start()
                replica.notify = transport.notify
                transports.append(transport)
            agent = _enrolled_agent(first, broker.port)
            assert first.publish("digits_v1", "1.0.0").code == 0
            assert first.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
            agent.start()
            assert agent.session.wait_ready(WAIT)
            assert agent.run_cycle().states == {"digits": "probation"}
            assert agent.check_probation() == {"digits": "committed"}
            assert agent.host.current_version("digits") == "1.0.0"

            def reported() -> bool:
                for transport in transports:
                    transport.sink.flush()
                state = json.loads(first.cli("fleet", "status", "--json").out)[0]
                return (state["reported_state"] or {}).get("state") == "committed"

            wait_for(reported, WAIT, "the committed report in the database")
            # Both replicas stayed connected, and each took a share of the requests.
            counters = [t.bridge.counters() for t in transports]
            assert all(c.requests > 0 for c in counters), [c.requests for c in counters]
            log = broker.broker.log()
            assert log.count("as _edgeota-server-") >= 2, log
            assert "already connected" not in log, log
            # Every report was taken in by one replica only: none looked replayed.
            assert sum(c.device_messages for c in counters) > 0
            with first.ctx.sessions() as session:
                rejected = session.scalars(select(AuditEntry.detail).where(
                    AuditEntry.action == "report.rejected")).all()
            assert rejected == []
        finally:
            if agent is not None:
                agent.close()
            for transport in transports:
                transport.stop()
            second.stop()


def _enrolled_agent(server: RunningServer, mqtt_port: int) -> Agent:
    """pi-1 enrolled through the CLI, pointed at the external broker."""
    import dataclasses

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    config = dataclasses.replace(config, mqtt_url=f"mqtts://127.0.0.1:{mqtt_port}")
    config.save()
    return Agent(config, AgentSettings(probation_seconds=0, probation_min_inferences=0),
                 transport="mqtt")
