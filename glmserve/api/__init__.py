"""The HTTP surface (FastAPI): thin mapping from OpenAI requests to a format and an engine."""
