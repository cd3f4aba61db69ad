"""The OpenAI Responses API (``/v1/responses`` and ``GET`` / ``DELETE /v1/responses/{id}``) on the
shared core.

- ``schemas.py``: request models.
- ``mapping.py``: input items, tools, tool choice -> ``ChatRequest`` + ``GenerationOptions``.
- ``shape.py``: output items and stream events (one fold for both).
- ``store.py``: stored responses, per API key: the contract; ``store_sqlite.py`` and
  ``store_postgres.py`` keep it, ``store_factory.py`` opens the one ``--responses-db`` names.
- ``seal.py``: ``encrypted_content`` for reasoning items.
- ``routes.py``: the endpoint and its router.
"""
