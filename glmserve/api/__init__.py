"""The HTTP surface, thin on purpose.

- ``app.py``: ``create_app`` (services, middleware, one router per endpoint module).
- ``middleware.py``: pure-ASGI API keys, body-size limit, request counts.
- ``errors.py``: ``APIError`` and the error shape each path prefix answers in.
- ``runner.py``: the ``Endpoint`` protocol and the one route skeleton (model check, health,
  admission, prepare, stream or complete, disconnect, request log).
- ``admission.py``: the bound on requests in flight and the request log.
- ``mapping.py``: request fields -> ``ChatRequest`` (tools, tool_choice, thinking, formats).
- ``pipeline.py``: prompt, context, constraint, generation and the one per-choice fold.
- ``thinking_budget.py``: reasoning cut at its budget, then the answer (two engine requests).
- ``chat.py``, ``completions.py``: the OpenAI endpoints; ``info.py``: models, health, metrics.
- ``responses.py``: the OpenAI Responses endpoint, with ``responses_schemas.py`` (request
  models), ``responses_mapping.py`` (items/tools -> chat), ``responses_shape.py`` (output items
  and stream events), ``responses_store.py`` (SQLite) and ``reasoning_seal.py`` (encrypted_content).
- ``messages.py``: Anthropic's Messages API, with ``anthropic_schemas.py`` (request models),
  ``anthropic_mapping.py`` (request -> ``ChatRequest``) and ``anthropic_shape.py`` (content
  blocks, stream events, error bodies).

A new endpoint is a module with a request mapping (body -> ``ChatRequest`` +
``GenerationOptions``) and a response shape (final JSON, stream events), listed in
``app.ROUTERS``.
"""
