"""Model architectures as pure JAX functions (`models/transformer.py`), their configs, weight
loading and tokenizers."""
