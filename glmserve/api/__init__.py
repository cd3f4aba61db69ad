"""The HTTP surface, thin on purpose.

- ``app.py``: ``create_app`` (services, middleware, one router per endpoint module).
- ``middleware.py``: pure-ASGI API keys, the body (size limit, read deadline), request counts,
  and the owner of each request's leases.
- ``http_protocol.py``: uvicorn's HTTP/1.1 protocol, bounded: the head (bytes, time) and each write (time).
- ``errors.py``: ``APIError`` and the error shape each path prefix answers in.
- ``runner.py``: the ``Endpoint`` protocol and the one route skeleton (model check, health,
  admission, prepare, stream or complete, disconnect, request log).
- ``admission.py``: the bound on requests in flight, the lease (slot + engine requests) an
  admitted request holds, and the request log.
- ``mapping.py``: request fields -> ``ChatRequest`` (tools, tool_choice, thinking, formats).
- ``pipeline.py``: prompt, context, constraint, generation and the one per-choice fold.
- ``thinking_budget.py``: reasoning cut at its budget, then the answer (two engine requests).
- ``schemas.py``: the Chat Completions request models, the canonical internal request shape
  (and ``RequestBody``, the base of every protocol's request models); ``info.py``: models,
  health, metrics.

One package per protocol, each with its schemas, mapping, shape and routes:

- ``openai/``: Chat Completions and Completions.
- ``anthropic/``: Anthropic's Messages API.
- ``responses/``: the OpenAI Responses API (with its store and reasoning seal).

A new endpoint is a module (a new protocol, a package) with a request mapping (body -> ``ChatRequest`` +
``GenerationOptions``) and a response shape (final JSON, stream events), listed in
``app.ROUTERS``.
"""
