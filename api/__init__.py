"""HTTP layer: the falcon app, its resources and request parsing."""
