"""The parts :class:`~llmopt.nn.sparse_linear.SparseLinear` composes: a storage layout (bitmask or N:M),
the kept values (float or quantized codes), a runtime (dense copy, compressed, semi-structured), and the
module plumbing for stored tensors of data-dependent shape."""

from .layouts import BitmaskLayout, NMLayout, SparseLayout, make_layout, nm_index_bits
from .runtimes import RUNTIMES, Runtime, get_runtime
from .storage import StoredTensorsLinear
from .values import FloatValues, KeptValues, QuantizedValues

__all__ = ["SparseLayout", "BitmaskLayout", "NMLayout", "make_layout", "nm_index_bits",
           "KeptValues", "FloatValues", "QuantizedValues", "Runtime", "RUNTIMES", "get_runtime",
           "StoredTensorsLinear"]
