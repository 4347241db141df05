"""Cross-backend conformance suite: a float64 reference and the checks against it.

- ``reference``: the naive float64 reference, independent of the core;
- ``cases``, ``expected``, ``golden``: the named cases, their expected values from the
  reference, and the committed golden vectors (``golden.npz`` + ``golden.json``);
- ``arrays``, ``runner``, ``backends``, ``adapter_backends``, ``registry``: how a case
  runs on a library (the core on a namespace, or a framework adapter);
- ``checks``, ``properties``: the relative-error checks and the property checks;
- ``matrix``, ``cli``: the backend-by-check matrix and the ``portable-brn conformance``
  command (also ``python -m portable_brn.conformance``);
- ``test_suite``, ``test_golden``: the same checks as tests
  (``pytest --pyargs portable_brn.conformance``).
"""
