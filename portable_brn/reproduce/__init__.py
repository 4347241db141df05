"""``portable-brn reproduce``: the paper's comparison (Ioffe 2017, section 4) in minutes.

The same small network is trained with batch norm and with Batch Renormalization in
three regimes (i.i.d. batches, micro-batches of 2, batches from 2 labels) on any
backend, and evaluated in inference mode on held-out data.  One module per job:

- ``data``: the digits or an ``.npz``, split and standardized;
- ``regimes``: how training batches are drawn and how finely they are normalized;
- ``methods``: batch norm and Batch Renormalization as options of the same layer;
- ``backends``: one small interface (build, train step, predict) and one module per
  framework (NumPy by hand, PyTorch, JAX/Flax);
- ``experiment``: the loop, written once for every backend;
- ``report`` and ``plot``: the table, the JSON and the PNG;
- ``cli``: options, one-line errors, exit codes;
- ``errors``: the error the user can fix, and missing-package hints.

Nothing here imports torch or jax unless that backend is chosen.
"""
