"""Model: Llama-style trunk, MTP heads, shared norm + unembedding."""

from flax import nnx

# Parameters are created unsharded and placed by a jitted init with explicit out_shardings
# (mtp.train.state); eager sharding would need a mesh in context at every construction.
nnx.use_eager_sharding(False)

from mtp.model.lm import MTPLM, abstract_params  # noqa: E402

__all__ = ["MTPLM", "abstract_params"]
