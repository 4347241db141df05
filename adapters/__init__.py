"""Framework adapters over the portable_brn core, one module per framework.

Import the one you use (``portable_brn.adapters.array``, ``.torch``, ``.jax``,
``.flax``); none is imported here, so no framework is loaded until asked for.
"""
