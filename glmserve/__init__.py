"""glmserve: an OpenAI-compatible server for GLM chat models on vLLM."""

__version__ = "0.1.0"
