"""The model: base encoder, LoRA adapters, training and the adapter store."""
