"""Import uploaded models (ONNX, torch.export ``.pt2``) as torch modules of real ``nn`` layers."""

from .errors import ERROR_CODES, ModelImportError
from .loading import DEFAULT_MAX_BYTES, ImportedModel, apply_output_activation, load_model, verify_reproduces

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ERROR_CODES",
    "ImportedModel",
    "ModelImportError",
    "apply_output_activation",
    "load_model",
    "verify_reproduces",
]
