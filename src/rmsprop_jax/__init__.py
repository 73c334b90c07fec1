"""rmsprop-jax: RMSProp for JAX as an Optax gradient transformation.

The public API is this module's ``__all__``; everything in ``_``-prefixed
modules is private.
"""

from rmsprop_jax import interop, presets
from rmsprop_jax._codecs import QuantizedLeaf, decode
from rmsprop_jax._formats import Float, Fp8, Int4, Int8
from rmsprop_jax._quantize import dequantize_blockwise, quantize_blockwise
from rmsprop_jax._transform import RmsPropState, rmsprop, scale_by_rms, update_and_apply

__version__ = "0.1.0"

__all__ = [
    "Float",
    "Fp8",
    "Int4",
    "Int8",
    "QuantizedLeaf",
    "RmsPropState",
    "__version__",
    "decode",
    "dequantize_blockwise",
    "interop",
    "presets",
    "quantize_blockwise",
    "rmsprop",
    "scale_by_rms",
    "update_and_apply",
]
