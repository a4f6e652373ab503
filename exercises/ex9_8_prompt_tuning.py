# Exercise 9.8: your file to edit. Generated from solutions/ex9_8_prompt_tuning.py by make_stubs.py (body sha256 0ce3a819b2d9).
"""Exercise 9.8 -- prompt tuning (Lester et al. 2021): a learned soft prompt.

Instead of changing any weight, learn ``prompt_length`` vectors in the embedding
space and put them in front of every input sequence::

    input embeddings  (batch, seq, d)          e.g. "The movie was great"
    soft prompt       (prompt_length, d)       [p1][p2][p3]   (trainable)
    model input       (batch, prompt_length + seq, d) = [p1][p2][p3] The movie was great

The frozen model then reads the prompt as if it were context. Only
``prompt_length * d_model`` numbers are trained.

Your tasks: ``__init__``, ``forward``, ``backward``, ``num_parameters``, and
``extend_attention_mask`` (the padding mask must cover the prompt positions too).

Check your work:  ``python exercises/check.py 9.8``
"""
import numpy as np


class PromptTuning:
    """A soft prompt of ``prompt_length`` vectors of size ``d_model``."""

    def __init__(self, d_model, prompt_length=20, init_from_vocab=None, rng=None):
        """Attributes to set: ``d_model``, ``prompt_length`` and

            prompt  ``(prompt_length, d_model)``:
                    * with ``init_from_vocab`` (the ``(vocab, d_model)`` embedding
                      table): a *copy* of ``prompt_length`` rows chosen with
                      ``rng.integers(0, vocab, prompt_length)`` -- starting from real
                      token embeddings works better than noise (Lester et al. §3);
                    * otherwise ``rng.standard_normal((prompt_length, d_model)) * 0.5``.

        Raise ``ValueError`` if ``init_from_vocab`` is not ``(vocab, d_model)``.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        raise NotImplementedError("Exercise 9.8: store the sizes; prompt = copied vocabulary rows, or scaled noise")

    def forward(self, input_embeds):
        """``(batch, seq, d_model)`` -> ``(batch, prompt_length + seq, d_model)``, prompt first.

        Every sequence of the batch gets the same prompt. Raise ``ValueError``
        when ``input_embeds`` is not 3-D with last axis ``d_model``.
        Hint: ``np.broadcast_to`` the prompt to ``(batch, P, d)``, then concatenate.
        """
        raise NotImplementedError("Exercise 9.8: validate, broadcast the prompt over the batch, concatenate on axis 1")

    def backward(self, grad_output):
        """Given ``dL/d(output)`` ``(batch, P + seq, d)``: set ``self.prompt_grad``
        ``(P, d)`` and return the gradient for the original input ``(batch, seq, d)``.

        The prompt is one parameter used by every sequence of the batch, so its
        gradient is the *sum* of the per-sequence gradients (not the mean).
        """
        raise NotImplementedError("Exercise 9.8: split axis 1 at P: the first P positions belong to the prompt")

    def num_parameters(self):
        raise NotImplementedError("Exercise 9.8: the number of elements of the prompt")


def extend_attention_mask(attention_mask, prompt_length):
    """``(batch, seq)`` mask of 1 (real token) / 0 (padding) -> ``(batch, P + seq)``.

    The prompt positions are always visible: prepend ``prompt_length`` ones to
    every row, keeping the mask's dtype.
    """
    raise NotImplementedError("Exercise 9.8: ones of shape (batch, P) in front of the mask")
