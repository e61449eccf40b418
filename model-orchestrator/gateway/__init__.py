"""The gateway in front of several pods (docs/DEPLOYMENT.md "Several pods behind one URL").

The front is the LiteLLM proxy, in its own environment (requirements.txt, pinned with hashes).
What is ours: the pure ranking of pods (policy.py), the LiteLLM plug-in that applies it from the
pods' published states (plugin.py), and the rendering of the proxy's config (render.py).
"""
