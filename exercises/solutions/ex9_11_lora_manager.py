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
        # BEGIN SOLUTION keep the base weights; no adapters yet, none active
        self.base_weights = base_weights
        self.adapters = {}
        self.active_adapter = None
        # END SOLUTION

    def add_adapter(self, name, rank=8, alpha=16.0, target_layers=None, rng=None):
        """Create adapter ``name`` on ``target_layers`` (default: every base layer).

        Store ``self.adapters[name] = {"rank", "alpha", "scaling", "A": {layer: (r, in)},
        "B": {layer: (out, r)}}`` with ``A`` uniform in +-1/sqrt(in) and ``B`` zeros.
        The first adapter added becomes active. Raise ``ValueError`` for a name that
        already exists or a layer that is not in the base.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        # BEGIN SOLUTION validate; create the factors for each target; activate if first
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} already exists")
        layers = list(self.base_weights) if target_layers is None else list(target_layers)
        unknown = [n for n in layers if n not in self.base_weights]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; base layers: {sorted(self.base_weights)}")
        A, B = {}, {}
        for layer in layers:
            d_out, d_in = self.base_weights[layer].shape
            bound = 1.0 / np.sqrt(d_in)
            A[layer] = rng.uniform(-bound, bound, (rank, d_in))       # (r, in)
            B[layer] = np.zeros((d_out, rank))                         # (out, r)
        self.adapters[name] = {"rank": rank, "alpha": alpha, "scaling": alpha / rank, "A": A, "B": B}
        if self.active_adapter is None:
            self.active_adapter = name
        # END SOLUTION

    def set_adapter(self, name):
        """Make ``name`` the active adapter; ``ValueError`` (listing the known names) if unknown."""
        # BEGIN SOLUTION check the name, then switch
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; known: {sorted(self.adapters)}")
        self.active_adapter = name
        # END SOLUTION

    def delta_weight(self, layer, adapter=None):
        """``scaling * B @ A`` of ``adapter`` (default: the active one) for ``layer``,
        ``(out, in)``; zeros when that adapter does not target the layer or none is active."""
        # BEGIN SOLUTION look up the adapter; zeros if it has no factors for this layer
        name = self.active_adapter if adapter is None else adapter
        W = self.base_weights[layer]
        if name is None or layer not in self.adapters[name]["A"]:
            return np.zeros_like(W)
        ad = self.adapters[name]
        return ad["scaling"] * ad["B"][layer] @ ad["A"][layer]
        # END SOLUTION

    def forward(self, layer, x):
        """``x (..., in)`` through ``layer`` with the active adapter: ``x W^T + s (x A^T) B^T``.

        Use the factors (two thin products), not the dense ``delta_weight``.
        """
        # BEGIN SOLUTION frozen product plus the active adapter's low-rank path, if any
        out = x @ self.base_weights[layer].T
        ad = self.adapters.get(self.active_adapter)
        if ad is not None and layer in ad["A"]:
            out = out + ad["scaling"] * (x @ ad["A"][layer].T) @ ad["B"][layer].T
        return out
        # END SOLUTION

    def merged_weights(self):
        """``{layer: W + delta}`` for the active adapter: new arrays, base untouched."""
        # BEGIN SOLUTION one merged array per base layer
        return {layer: W + self.delta_weight(layer) for layer, W in self.base_weights.items()}
        # END SOLUTION

    def add_weighted_adapter(self, adapters, weights, new_name):
        """Add adapter ``new_name`` whose update is exactly ``sum_i weights[i] * delta_i``.

        Stack the ranks (see the module docstring): rank ``sum(r_i)``, ``alpha`` equal
        to that rank (so scaling 1), and for every layer any of them targets:
        ``A = concat(A_i, axis=0)``, ``B = concat(w_i * s_i * B_i, axis=1)`` -- with
        zero blocks for an adapter that does not target the layer. Raise
        ``ValueError`` for unknown names or ``len(adapters) != len(weights)``.
        """
        # BEGIN SOLUTION validate; stack A's along rows and weighted, scaled B's along columns
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"need one weight per adapter, got {len(adapters)} and {len(weights)}")
        for n in adapters:
            if n not in self.adapters:
                raise ValueError(f"unknown adapter {n!r}; known: {sorted(self.adapters)}")
        if new_name in self.adapters:
            raise ValueError(f"an adapter named {new_name!r} already exists")
        parts = [self.adapters[n] for n in adapters]
        rank = sum(p["rank"] for p in parts)
        layers = [layer for layer in self.base_weights if any(layer in p["A"] for p in parts)]
        A, B = {}, {}
        for layer in layers:
            d_out, d_in = self.base_weights[layer].shape
            A[layer] = np.concatenate([p["A"].get(layer, np.zeros((p["rank"], d_in)))
                                       for p in parts], axis=0)                  # (sum r, in)
            B[layer] = np.concatenate([w * p["scaling"] * p["B"][layer] if layer in p["B"]
                                       else np.zeros((d_out, p["rank"]))
                                       for p, w in zip(parts, weights)], axis=1)  # (out, sum r)
        self.adapters[new_name] = {"rank": rank, "alpha": float(rank), "scaling": 1.0, "A": A, "B": B}
        # END SOLUTION

    def delete_adapter(self, name):
        """Remove ``name`` (``ValueError`` if unknown). If it was active, none is active."""
        # BEGIN SOLUTION check, delete, and clear the active adapter if it was this one
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; known: {sorted(self.adapters)}")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None
        # END SOLUTION
