"""Cross-backend conformance suite: a float64 reference and the checks against it."""
