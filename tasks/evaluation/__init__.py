"""The evaluation engine behind the verification and megaface stages, without Prefect.

Modules: :mod:`~tasks.evaluation.config` (the options: extraction, verification, MegaFace; imports
only pydantic), :mod:`~tasks.evaluation.model` (the model an evaluation runs: a training checkpoint,
an ONNX export or a torch module; its input size and normalisation), :mod:`~tasks.evaluation.embed`
(flip-test embedding extraction, torch and ONNX Runtime), :mod:`~tasks.evaluation.pairs` (pair
verification metrics, the InsightFace 10-fold protocol), :mod:`~tasks.evaluation.megaface`
(MegaFace noise removal, identification and verification metrics). Names are loaded on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.evaluation.config import ExtractionConfig
    from tasks.evaluation.embed import EmbeddingResult, OnnxEmbedder, extract_embeddings
    from tasks.evaluation.model import EvalModel, load_eval_model, model_digest
    from tasks.evaluation.pairs import VerificationResult, evaluate_verification

_HOMES = {
    "ExtractionConfig": "config",
    "EmbeddingResult": "embed", "OnnxEmbedder": "embed", "extract_embeddings": "embed",
    "EvalModel": "model", "load_eval_model": "model", "model_digest": "model",
    "VerificationResult": "pairs", "evaluate_verification": "pairs",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tasks.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tasks.evaluation.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
