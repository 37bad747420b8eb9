"""``omni serve``: the HTTP service (FastAPI). ``omni.server.app.create_app`` builds it."""
