"""Model architectures as pure JAX functions, their configs, weight loading and tokenizers."""
