"""The OpenAI endpoints on the shared core: ``chat.py`` (``/v1/chat/completions``, ``/tokenize``)
and ``completions.py`` (``/v1/completions``).

Their request models are the core's :mod:`glmserve.api.schemas`: OpenAI's chat shape is the
canonical internal request that the other protocols map onto.
"""
