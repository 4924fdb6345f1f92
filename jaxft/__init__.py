"""jaxft: fine-tune GPT models with JAX and Flax NNX."""
