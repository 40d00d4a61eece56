"""Serving: model workers (one process per model), upstreams and the router the API streams through."""
