"""Text models that transformers' Auto classes do not build as deltatune needs them."""
