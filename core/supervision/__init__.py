"""Supervision: what the orchestrator runs to manage model service processes, under
``core/service_manager.py``. Spawning and reaping process trees, the per-service state
machine, readiness and health probes, restart policy, parking calls, a child's environment,
log capture. Imports core.common, core.config and core.host, never the service runtime."""
