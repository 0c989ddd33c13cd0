"""The evaluation engine behind the verification and megaface stages, without Prefect.

Modules: :mod:`~tasks.evaluation.model` (the model an evaluation runs: a training checkpoint, an ONNX
export or a torch module; its input size and normalisation), :mod:`~tasks.evaluation.embed`
(flip-test embedding extraction, torch and ONNX Runtime), :mod:`~tasks.evaluation.pairs` (pair
verification metrics, the InsightFace 10-fold protocol), :mod:`~tasks.evaluation.megaface`
(MegaFace noise removal, identification and verification metrics), :mod:`~tasks.evaluation.ijb`
(IJB-B/IJB-C template pooling, 1:1 verification ROC and 1:N identification, as arcface_torch's
``eval_ijbc.py``), :mod:`~tasks.evaluation.plots` (ROC plots for the artifacts).
"""
from tasks.evaluation.embed import EmbeddingResult, OnnxEmbedder, extract_embeddings
from tasks.evaluation.model import EvalModel, ExtractionConfig, load_eval_model, model_digest
from tasks.evaluation.pairs import VerificationResult, evaluate_verification

__all__ = ["EmbeddingResult", "EvalModel", "ExtractionConfig", "OnnxEmbedder", "VerificationResult",
           "evaluate_verification", "extract_embeddings", "load_eval_model", "model_digest"]
