"""The HTTP control API (``leaseflow serve``): every client operation over HTTP.

- :mod:`~leaseflow.api.app`: ``create_app`` (the FastAPI app; uvicorn's factory);
- :mod:`~leaseflow.api.auth`: bearer tokens, the request's principal and client;
- :mod:`~leaseflow.api.errors`: every error as ``{"code", "message", "detail"}``;
- :mod:`~leaseflow.api.models`: the request and response models (the OpenAPI);
- :mod:`~leaseflow.api.routes_runs`, :mod:`~leaseflow.api.routes_admin`,
  :mod:`~leaseflow.api.routes_health`: the endpoints, each a thin layer over a client
  method.
"""
