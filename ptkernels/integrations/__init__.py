"""Integrations with Hugging Face transformers and PEFT.

Importing this package does not import transformers or PEFT (they are imported when ``patch`` runs):
:mod:`ptkernels.integrations.peft` holds ``patch`` / ``unpatch``,
:mod:`ptkernels.integrations.transformers` the "ptkernels" attention implementation.
"""

from .peft import is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "is_patched"]
