"""Pure domain code: digests, names, manifests and events. No I/O."""
