"""nginx as the data plane, the orchestrator as its control plane (``settings.data_plane.kind: nginx``).

nginx listens on the orchestrator's address. A request for a ready pinned model, named by its own name on
a JSON route its type serves, goes from nginx straight to that model's service (``route.js`` picks it from
the body's ``model``); every other request goes on to the orchestrator, over a socket only it and nginx can
reach, and is handled exactly as without nginx. ``policy`` decides what may take the fast path (pure),
``conf`` writes nginx's configuration and route table (pure), ``nginx`` runs the process (mechanism) and
``plane`` keeps the route table in step with the services' states.
"""
