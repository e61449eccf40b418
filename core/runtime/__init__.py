"""The service runtime: what runs inside every model service process, under
``core/base_service.py``. Its middlewares (service token, readiness, concurrency, cancel on
disconnect), parking and the host copy of weights, the worker that runs blocking model calls,
the OpenAI text layer, torch devices and dtypes. Imports core.common and core.host, never
supervision or config: a model service loads none of the orchestrator's machinery."""
