"""Text encoders and causal LLMs: resolving names to weights, loading them, caching what they compute."""
