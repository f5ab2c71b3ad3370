"""Host-side input processing: images, chat prompts, token/position batches (NumPy)."""
