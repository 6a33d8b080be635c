from .interface import prefix_attention
from .reference import prefix_attention_reference

__all__ = ["prefix_attention", "prefix_attention_reference"]
