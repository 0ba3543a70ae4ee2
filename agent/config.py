"""``agent.toml``, as the agent reads it: the names of :mod:`edgeota.runtime.agent_config`.

The file is written by the operator's enrolment (``edgeota device enroll``)
and read here, so its schema lives below both sides, in ``edgeota.runtime``;
the agent keeps this name for what it loads.
"""

from __future__ import annotations

from edgeota.runtime.agent_config import AGENT_CONFIG, AgentConfig, AgentConfigError

__all__ = ["AGENT_CONFIG", "AgentConfig", "AgentConfigError"]
