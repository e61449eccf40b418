"""``models.yaml``, typed: the schema (``schema``), its checks, error messages and generated
docs, rendering a profile's file for provisioning (``render``, ``rehearsal``) and writing a new
model service from the guide (``scaffold``, standard library only). Read by the orchestrator,
the provisioning and the tools; never by the service runtime. This file imports nothing, so
``python -m core.config.scaffold`` runs before any environment exists."""
