# Exercise 9.11: your file to edit. Generated from solutions/ex9_11_lora_manager.py by make_stubs.py (body sha256 bbd42c8b2401).
"""Exercise 9.11 (challenge) -- a LoRA manager: many adapters over one frozen base.

One base model, many small task adapters: the serving pattern LoRA makes cheap.
The manager holds the frozen weights of some linear layers (by name) and any
number of named LoRA adapters, each with its own rank, alpha and targeted layers::

    base_weights = {"q": Wq, "v": Wv, ...}        frozen, (out, in) each, never modified
    adapters["sql"]  = {"rank": 4, "alpha": 8,  "scaling": 2.0, "A": {"q": ..}, "B": {"q": ..}}
    adapters["chat"] = {"rank": 8, "alpha": 16, "scaling": 2.0, "A": {"q": .., "v": ..}, ...}

Your tasks: add, switch, run, merge, combine (``add_weighted_adapter``) and delete.

Combining exactly: ``sum_i w_i * s_i * B_i A_i`` is itself a product of two
factors if you *stack the ranks*::

    A = [A_1; A_2]  (r1 + r2, in)        B = [w_1 s_1 B_1, w_2 s_2 B_2]  (out, r1 + r2)
    B @ A = w_1 s_1 B_1 A_1 + w_2 s_2 B_2 A_2           (with scaling 1)

(Averaging the ``A``'s and the ``B``'s separately would *not* give the weighted sum
of the updates: ``(B1 + B2)(A1 + A2)`` has cross terms.) Hugging Face calls the
exact method ``combination_type="cat"``.

Check your work:  ``python exercises/check.py 9.11``
"""
import numpy as np


class LoRAManager:
    def __init__(self, base_weights):
        """``base_weights``: ``{layer_name: (out, in) array}``. Keep the dict (never
        modify its arrays). Set ``self.adapters = {}`` and ``self.active_adapter = None``.
        """
        raise NotImplementedError("Exercise 9.11: keep the base weights; no adapters yet, none active")

    def add_adapter(self, name, rank=8, alpha=16.0, target_layers=None, rng=None):
        """Create adapter ``name`` on ``target_layers`` (default: every base layer).

        Store ``self.adapters[name] = {"rank", "alpha", "scaling", "A": {layer: (r, in)},
        "B": {layer: (out, r)}}`` with ``A`` uniform in +-1/sqrt(in) and ``B`` zeros.
        The first adapter added becomes active. Raise ``ValueError`` for a name that
        already exists or a layer that is not in the base.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        raise NotImplementedError("Exercise 9.11: validate; create the factors for each target; activate if first")

    def set_adapter(self, name):
        """Make ``name`` the active adapter; ``ValueError`` (listing the known names) if unknown."""
        raise NotImplementedError("Exercise 9.11: check the name, then switch")

    def delta_weight(self, layer, adapter=None):
        """``scaling * B @ A`` of ``adapter`` (default: the active one) for ``layer``,
        ``(out, in)``; zeros when that adapter does not target the layer or none is active."""
        raise NotImplementedError("Exercise 9.11: look up the adapter; zeros if it has no factors for this layer")

    def forward(self, layer, x):
        """``x (..., in)`` through ``layer`` with the active adapter: ``x W^T + s (x A^T) B^T``.

        Use the factors (two thin products), not the dense ``delta_weight``.
        """
        raise NotImplementedError("Exercise 9.11: frozen product plus the active adapter's low-rank path, if any")

    def merged_weights(self):
        """``{layer: W + delta}`` for the active adapter: new arrays, base untouched."""
        raise NotImplementedError("Exercise 9.11: one merged array per base layer")

    def add_weighted_adapter(self, adapters, weights, new_name):
        """Add adapter ``new_name`` whose update is exactly ``sum_i weights[i] * delta_i``.

        Stack the ranks (see the module docstring): rank ``sum(r_i)``, ``alpha`` equal
        to that rank (so scaling 1), and for every layer any of them targets:
        ``A = concat(A_i, axis=0)``, ``B = concat(w_i * s_i * B_i, axis=1)`` -- with
        zero blocks for an adapter that does not target the layer. Raise
        ``ValueError`` for unknown names or ``len(adapters) != len(weights)``.
        """
        raise NotImplementedError("Exercise 9.11: validate; stack A's along rows and weighted, scaled B's along columns")

    def delete_adapter(self, name):
        """Remove ``name`` (``ValueError`` if unknown). If it was active, none is active."""
        raise NotImplementedError("Exercise 9.11: check, delete, and clear the active adapter if it was this one")
