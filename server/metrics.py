"""Prometheus metrics of one server, in its own registry (no process-global state).

Counters move where the work happens (repository fetches, publishing,
director signing); fleet gauges are computed from the database at scrape
time, so every replica reports the same fleet and nothing drifts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota.server.db.models import (
    Assignment,
    Deployment,
    DeploymentStatus,
    Device,
    Release,
)

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _FleetCollector(Collector):
    def __init__(self, sessions: Callable[[], Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = GaugeMetricFamily("edgeota_devices", "Enrolled devices by last reported state",
                                    labels=["state"])
        online = GaugeMetricFamily("edgeota_devices_online", "Devices currently online")
        releases = GaugeMetricFamily("edgeota_releases", "Releases by status", labels=["status"])
        phase = GaugeMetricFamily(
            "edgeota_rollout_phase", "Current phase (1-based) of active and paused deployments",
            labels=["deployment", "release", "status"])
        rollout_devices = GaugeMetricFamily(
            "edgeota_rollout_devices", "Devices of active and paused deployments by state",
            labels=["deployment", "state"])
        with self._sessions() as session:
            states: dict[str, int] = {}
            for state in session.scalars(select(Device.reported_state)):
                key = (state or {}).get("state", "unknown")
                states[key] = states.get(key, 0) + 1
            for key, count in sorted(states.items()):
                devices.add_metric([key], count)
            online.add_metric([], session.scalar(
                select(func.count()).select_from(Device).where(Device.online)) or 0)
            for status, count in session.execute(
                select(Release.status, func.count()).group_by(Release.status)
            ):
                releases.add_metric([str(status)], count)
            live = (DeploymentStatus.ACTIVE, DeploymentStatus.PAUSED)
            for deployment in session.scalars(
                    select(Deployment).where(Deployment.status.in_(live))):
                phase.add_metric([str(deployment.id), f"{deployment.release.name}@"
                                  f"{deployment.release.version}", str(deployment.status)],
                                 deployment.current_phase + 1)
            for deployment_id, state, count in session.execute(
                select(Assignment.deployment_id, Assignment.state, func.count())
                .join(Deployment, Deployment.id == Assignment.deployment_id)
                .where(Deployment.status.in_(live))
                .group_by(Assignment.deployment_id, Assignment.state)
            ):
                rollout_devices.add_metric([str(deployment_id), str(state)], count)
        yield devices
        yield online
        yield releases
        yield phase
        yield rollout_devices


class ServerMetrics:
    """The server's metrics; ``render()`` is what ``GET /metrics`` answers."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.fetch_requests = Counter(
            "edgeota_fetch_requests_total", "Repository file requests served",
            ["transport", "kind"], registry=self.registry)
        self.fetch_bytes = Counter(
            "edgeota_fetch_bytes_total", "Repository bytes served",
            ["transport", "kind"], registry=self.registry)
        self.publish_seconds = Histogram(
            "edgeota_publish_seconds", "Time to check, validate and publish a release",
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.director_sign_seconds = Histogram(
            "edgeota_director_sign_seconds", "Time to sign one device's director metadata",
            registry=self.registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
        self.registry.register(_FleetCollector(sessions))
        # process_cpu_seconds_total and friends: what a scraper (or `edgeota sim run`
        # joining this server) divides by updates to get the server's cost per update.
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
