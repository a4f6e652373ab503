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
        # BEGIN SOLUTION store the sizes; prompt = copied vocabulary rows, or scaled noise
        self.d_model, self.prompt_length = d_model, prompt_length
        if init_from_vocab is not None:
            vocab = np.asarray(init_from_vocab)
            if vocab.ndim != 2 or vocab.shape[1] != d_model:
                raise ValueError(f"init_from_vocab must be (vocab, {d_model}), got {vocab.shape}")
            rows = rng.integers(0, vocab.shape[0], prompt_length)
            self.prompt = vocab[rows].copy()                # (P, d), a copy, not a view
        else:
            self.prompt = rng.standard_normal((prompt_length, d_model)) * 0.5
        # END SOLUTION

    def forward(self, input_embeds):
        """``(batch, seq, d_model)`` -> ``(batch, prompt_length + seq, d_model)``, prompt first.

        Every sequence of the batch gets the same prompt. Raise ``ValueError``
        when ``input_embeds`` is not 3-D with last axis ``d_model``.
        Hint: ``np.broadcast_to`` the prompt to ``(batch, P, d)``, then concatenate.
        """
        # BEGIN SOLUTION validate, broadcast the prompt over the batch, concatenate on axis 1
        if input_embeds.ndim != 3 or input_embeds.shape[-1] != self.d_model:
            raise ValueError(f"input_embeds must be (batch, seq, {self.d_model}), "
                             f"got {input_embeds.shape}")
        batch = input_embeds.shape[0]
        prompt = np.broadcast_to(self.prompt, (batch,) + self.prompt.shape)   # (B, P, d)
        return np.concatenate([prompt, input_embeds], axis=1)                 # (B, P+T, d)
        # END SOLUTION

    def backward(self, grad_output):
        """Given ``dL/d(output)`` ``(batch, P + seq, d)``: set ``self.prompt_grad``
        ``(P, d)`` and return the gradient for the original input ``(batch, seq, d)``.

        The prompt is one parameter used by every sequence of the batch, so its
        gradient is the *sum* of the per-sequence gradients (not the mean).
        """
        # BEGIN SOLUTION split axis 1 at P: the first P positions belong to the prompt
        P = self.prompt_length
        self.prompt_grad = grad_output[:, :P].sum(axis=0)   # (P, d)
        return grad_output[:, P:]                           # (B, T, d)
        # END SOLUTION

    def num_parameters(self):
        # BEGIN SOLUTION the number of elements of the prompt
        return self.prompt.size
        # END SOLUTION


def extend_attention_mask(attention_mask, prompt_length):
    """``(batch, seq)`` mask of 1 (real token) / 0 (padding) -> ``(batch, P + seq)``.

    The prompt positions are always visible: prepend ``prompt_length`` ones to
    every row, keeping the mask's dtype.
    """
    # BEGIN SOLUTION ones of shape (batch, P) in front of the mask
    ones = np.ones((attention_mask.shape[0], prompt_length), dtype=attention_mask.dtype)
    return np.concatenate([ones, attention_mask], axis=1)
    # END SOLUTION
