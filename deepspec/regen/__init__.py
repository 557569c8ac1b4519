"""Answer regeneration with the target."""
