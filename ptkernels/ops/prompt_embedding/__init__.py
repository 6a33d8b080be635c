from .interface import prompt_embedding, virtual_token_embedding
from .reference import prompt_embedding_reference, virtual_token_embedding_reference

__all__ = [
    "prompt_embedding",
    "virtual_token_embedding",
    "prompt_embedding_reference",
    "virtual_token_embedding_reference",
]
