"""What both sides use: the service runtime (inside every model service) and supervision (the
orchestrator's side). OpenAI-style errors, ASGI and server-sent-event helpers, asyncio helpers,
logging, secret redaction, and the contract between the two sides (core/common/contract.py).
Imports nothing else of ``core``."""
