"""ai-orchestrator: many model services behind one OpenAI-compatible endpoint."""
