"""Engines behind glmserve: ``vllm_engine`` (real) and ``scripted`` (protocol tests)."""

from glmserve.engine.base import Delta, Engine, EngineUnavailable, GenerateParams

__all__ = ["Delta", "Engine", "EngineUnavailable", "GenerateParams"]
