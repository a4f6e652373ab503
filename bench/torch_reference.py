"""The mini GPT written directly in PyTorch eager: the reference our step is timed against.

``bench.py`` times it in the same process, ``bench_peft.py`` in a child process;
neither the library nor the tests need PyTorch (the optional ``torch`` / ``hf`` extras).
"""
from __future__ import annotations

from minigpt import GPTConfig


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_torch(config: GPTConfig, frozen=False):
    """The same architecture in PyTorch eager (2 threads); returns ``step(tokens, targets)``.

    Same shapes: token + position embeddings, pre-LN blocks with separate q/k/v/out
    projections (with bias), causal attention, fc1 -> tanh-GELU -> fc2, final
    LayerNorm, LM head tied to the token embedding; AdamW. ``frozen``: no parameter
    requires grad and the gradient stops at the embedding output, as in ``FrozenBase``.
    """
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(2)
    torch.manual_seed(0)
    D, H = config.d_model, config.n_heads

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(D), tnn.LayerNorm(D)
            self.q_proj, self.k_proj = tnn.Linear(D, D), tnn.Linear(D, D)
            self.v_proj, self.out_proj = tnn.Linear(D, D), tnn.Linear(D, D)
            self.fc1, self.fc2 = tnn.Linear(D, 4 * D), tnn.Linear(4 * D, D)

        def attn(self, x):
            B, T, _ = x.shape
            split = lambda t: t.view(B, T, H, D // H).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, H, T, dh)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, D))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.fc2(F.gelu(self.fc1(self.ln_2(x)), approximate="tanh"))

    class TorchGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = tnn.Embedding(config.vocab_size, D)
            self.embed_positions = tnn.Embedding(config.context_length, D)
            self.layers = tnn.ModuleList(Block() for _ in range(config.n_layers))
            self.ln_f = tnn.LayerNorm(D)

        def embed(self, tokens):
            return self.embed_tokens(tokens) + self.embed_positions.weight[: tokens.shape[1]]

        def forward_embeds(self, x):
            for block in self.layers:
                x = block(x)
            return self.ln_f(x) @ self.embed_tokens.weight.T                # tied head

    model = TorchGPT()
    model.requires_grad_(not frozen)
    optimizer = None if frozen else torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(tokens, targets):
        if optimizer is not None:
            optimizer.zero_grad()
        x = model.embed(tokens)
        if frozen:
            x = x.detach().requires_grad_(True)
        logits = model.forward_embeds(x)
        F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1)).backward()
        if optimizer is not None:
            optimizer.step()

    return step
