"""adc-jax: split learning of Vision Transformers with Attention-based Double Compression."""

from adc_jax.compress import Compressed, CompressionPlan, compress, compression_plan
from adc_jax.kmeans import KMeansResult, kmeans

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "CompressionPlan",
    "KMeansResult",
    "compress",
    "compression_plan",
    "kmeans",
]
