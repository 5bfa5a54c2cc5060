"""Weights: the one place where a checkpoint's stored bytes become the arrays the forward pass computes with.

* ``parameters.py``  the parameters of a Qwen2 model: names, shapes, random initialisation, checks
* ``store.py``       how a stored tensor becomes a compute array (kept, or converted per use in blocks),
                     and the products on either (`matmul_t`), bitwise the same
* ``plan.py``        the memory budget: which weights are kept, converted per use or streamed, and the
                     room a forward pass needs
* ``system.py``      what the machine offers: available memory (cgroups included), and malloc's setting
* ``backend.py``     the array module (NumPy or CuPy) and the compute dtypes

docs/weights.md tells the whole story, with the 7B measurements.
"""
