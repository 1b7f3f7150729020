"""Model definitions: decoder, vision towers, LLaVA composition, KV cache."""
