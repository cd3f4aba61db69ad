"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) on the shared core.

- ``schemas.py``: request models.
- ``mapping.py``: a Messages request -> ``ChatRequest`` + ``GenerationOptions``.
- ``shape.py``: content blocks, stream events, error bodies.
- ``routes.py``: the endpoint (request mapping + response shape) and its router.
"""
