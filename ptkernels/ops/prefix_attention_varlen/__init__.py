from .interface import prefix_attention_varlen
from .reference import prefix_attention_varlen_reference

__all__ = ["prefix_attention_varlen", "prefix_attention_varlen_reference"]
