"""Model export: pickle-free tensor serialisation (serialize), the naive baseline's int8 per-row +
zlib scheme (int8) and the 16,000,000-byte artifact accounting (artifact)."""
