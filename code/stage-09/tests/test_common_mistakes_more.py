"""Common PEFT mistakes 13-23 (met while building this module), each reproduced: the wrong
version shows its symptom, the right one does not. See ``test_common_mistakes.py``
for 1-12 and for how symptoms are measured.
"""
import numpy as np
import pytest
from gradcheck import well_scaled
from mistakes_support import CFG, MEASURED, base_model, batch, randomise_lora_B

from checkpoint import copy_into
from gradcheck import GradientMismatch, check_module, compare, numerical_gradient
from minigpt import CausalSelfAttention
from nf4 import quantize_nf4
from nn import Linear, cross_entropy, softmax
from peft import LoRALayer, LoRALinear
from peft_config import PromptTuningConfig
from peft_model import LoraConfig, get_peft_model
from quantization import QuantizedLinear

# ==== 13. merging twice ===============================================================
def test_13_merging_twice_doubles_the_update():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 8))
    layer = LoRALinear(W.copy(), lora_rank=2, lora_alpha=4, rng=rng)
    layer.lora.B = rng.standard_normal((6, 2))
    x = rng.standard_normal((3, 8))
    base, unmerged = x @ W.T, layer.forward(x)

    naive = W.copy()
    for _ in range(2):                                      # the mistake: merge in a loop, twice
        naive += layer.lora.delta_weight()
    np.testing.assert_allclose(x @ naive.T - base, 2 * (unmerged - base), rtol=1e-12)

    layer.merge_in_place()                                  # the fix: merge once, flag it
    np.testing.assert_allclose(layer.forward(x), unmerged, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge_in_place()
    model = get_peft_model(base_model(), LoraConfig(r=2))
    model.merge_adapter()
    with pytest.raises(ValueError, match="already merged"):
        model.merge_adapter()


# ==== 14. dropout left on at evaluation ===============================================
def test_14_dropout_left_on_at_evaluation():
    tokens, _ = batch()
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5))
    randomise_lora_B(model)
    model.train()                                           # the mistake: evaluate in train mode
    assert np.abs(model.forward(tokens) - model.forward(tokens)).max() > 1e-3
    model.eval()                                            # the fix
    first = model.forward(tokens)
    assert np.array_equal(first, model.forward(tokens))


# ==== 15. gradient checks with an all-ones upstream gradient ==========================
def _check(f, backward, x, G):
    """Gradient check of ``L = sum(f(x) * G)``: analytic ``backward(G)`` vs central differences."""
    numeric = numerical_gradient(lambda: float(np.sum(f(x) * G)), x)
    return compare("dx", backward(G), numeric, tol=1e-7)


def test_15_all_ones_upstream_gradient_hides_wrong_backward():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    s = softmax(x)
    right_softmax = lambda g: s * (g - (g * s).sum(-1, keepdims=True))   # noqa: E731
    wrong_softmax = lambda g: s * (g - g.mean(-1, keepdims=True))        # mean, not s-weighted
    W = rng.standard_normal((4, 6))
    h = rng.standard_normal((2, 5, 6))
    right_linear = lambda g: g @ W                                       # noqa: E731
    wrong_linear = lambda g: (g @ W)[:, ::-1]                            # positions swapped

    for f, x_, right, wrong in [(softmax, x, right_softmax, wrong_softmax),
                                (lambda t: t @ W.T, h, right_linear, wrong_linear)]:
        out_shape = f(x_).shape
        ones, G = np.ones(out_shape), rng.standard_normal(out_shape)
        assert _check(f, wrong, x_, ones) < 1e-7             # the mistake: the bug passes
        with pytest.raises(GradientMismatch):               # the fix: a random G catches it
            _check(f, wrong, x_, G)
        assert _check(f, right, x_, G) < 1e-7


# ==== 16. gradient checks with B = 0 ==================================================
class WrongAGradient(LoRALayer):
    """A LoRA layer whose ``A`` gradient forgets the scaling (dx and dB are right)."""

    def delta_backward(self, dout):
        r = self.rank
        x_drop, ax = self.cache[:2]                                        # lora_forward's cache
        self._accumulate("B", (dout.reshape(-1, self.out_features).T @ ax.reshape(-1, r))
                         * self.scaling)
        self._accumulate("A", (dout @ self.B).reshape(-1, r).T            # bug: no * scaling
                         @ x_drop.reshape(-1, self.in_features))
        return (dout @ self.B) * self.scaling @ self.A


def test_16_gradient_check_with_B_zero_hides_wrong_A_gradient():
    rng = np.random.default_rng(0)
    W, x = rng.standard_normal((5, 4)), rng.standard_normal((3, 4))

    def gradcheck(layer_cls, B):
        layer = layer_cls(4, 5, rank=2, alpha=6.0, rng=np.random.default_rng(1), dtype=np.float64)
        if B is not None:
            layer.B = B
        return check_module(layer, x, forward_kwargs={"W": W})

    assert max(gradcheck(WrongAGradient, None).values()) < 1e-7   # the mistake: B = 0, passes
    B = rng.standard_normal((5, 2))
    with pytest.raises(GradientMismatch, match="^A: "):          # the fix: randomise B first
        gradcheck(WrongAGradient, B)
    assert max(gradcheck(LoRALayer, B).values()) < 1e-7


# ==== 17. causal mask applied to the prefix ===========================================
def test_17_causal_mask_on_the_prefix(monkeypatch):
    rng = np.random.default_rng(0)
    attn = CausalSelfAttention(CFG, rng)
    well_scaled(attn)
    T, P = 4, 3
    x = rng.standard_normal((1, T, CFG.d_model))
    prefix = tuple(rng.standard_normal((P, CFG.n_heads, CFG.d_head)) for _ in range(2))

    def causal_over_everything(T, P, attention_mask=None):  # the mistake: tril over P+T keys
        return np.tril(np.ones((T, P + T), dtype=bool))[None, None]

    with monkeypatch.context() as m:
        m.setattr(CausalSelfAttention, "build_mask", staticmethod(causal_over_everything))
        attn.forward(x, prefix=prefix)
        wrong = attn.att.copy()                             # (1, H, T, P+T)
    assert not wrong[:, :, 0, 1:P].any()                    # query 0 sees only prefix slot 0
    assert not wrong[:, :, 0, P].any()                      # and not even its own token

    attn.forward(x, prefix=prefix)                          # the fix: causal among tokens only
    right = attn.att
    assert right[:, :, 0, :P].min() > 1e-3 and right[:, :, 0, P].min() > 1e-3
    expected = np.tril(np.ones((T, P + T), dtype=bool), k=P)  # = ones for the prefix + tril
    assert np.array_equal(CausalSelfAttention.build_mask(T, P)[0, 0], expected)


# ==== 18. prompt tuning: train and evaluate with different position conventions ======
def test_18_prompt_position_convention_mismatch():
    tokens, _ = batch()
    trained = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=3,
                                                             position_convention="keep"))
    logits = trained.forward(tokens)
    prompt = trained.prompt_encoder.prompt.copy()

    def evaluate_with(convention):
        model = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=3,
                                                               position_convention=convention))
        model.prompt_encoder.prompt[...] = prompt           # the same trained prompt
        return model.forward(tokens)

    assert np.abs(evaluate_with("shift") - logits).max() > 1e-2    # the mistake
    assert np.array_equal(evaluate_with("keep"), logits)           # the fix: same convention
    assert trained.peft_config["default"].to_dict()["position_convention"] == "keep"


# ==== 19. quantizing the LoRA weights instead of the base =============================
def test_19_quantizing_lora_weights_instead_of_base():
    rng = np.random.default_rng(0)
    d, r = 128, 8
    base = Linear(d, d, rng=rng)                            # float32 frozen base, 64 KiB
    A = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32)
    B = (rng.standard_normal((d, r)) * 0.1).astype(np.float32)    # a trained adapter
    delta = B @ A

    # the mistake: the base stays float, A and B go to NF4
    wrong_base_bytes = base.weight.nbytes
    qA, qB = quantize_nf4(A), quantize_nf4(B)
    wrong_delta = qB.dequantize() @ qA.dequantize()
    wrong_error = np.abs(wrong_delta - delta).max() / np.abs(delta).max()

    # the fix: the base goes to NF4, LoRA stays in float
    qbase = QuantizedLinear.from_linear(base)
    layer = LoRALinear(qbase, lora_rank=r, lora_alpha=r)
    layer.lora.A, layer.lora.B = A.copy(), B.copy()
    right_error = np.abs(layer.lora.delta_weight() - delta).max()

    wrong_saving = (A.nbytes + B.nbytes) - (qA.nbytes + qB.nbytes)
    right_saving = base.weight.nbytes - qbase.nbytes_weight
    MEASURED[19] = dict(float_base=wrong_base_bytes, nf4_base=qbase.nbytes_weight,
                        wrong_saving=wrong_saving, right_saving=right_saving, wrong_error=wrong_error)
    assert wrong_base_bytes == 4 * d * d                    # the base stays at 32 bits
    assert wrong_base_bytes > 7 * qbase.nbytes_weight       # instead of ~4.1 bits
    assert right_saving > 5 * wrong_saving                  # the bytes are in the base
    assert wrong_error > 0.02 and right_error == 0.0        # the trained update is distorted


# ==== 20. NF4 with one scale for the whole tensor =====================================
def test_20_nf4_without_blockwise_scales():
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.02, 4096).astype(np.float32)
    w[100] = 2.0                                            # one outlier, 100 standard deviations

    def mse_and_zeros(blocksize):
        q = quantize_nf4(w, blocksize=blocksize, double_quant=False).dequantize()
        return float(np.mean((q - w) ** 2)), float(np.mean(q == 0))

    wrong_mse, wrong_zeros = mse_and_zeros(w.size)          # the mistake: one absmax
    right_mse, right_zeros = mse_and_zeros(64)              # the fix: one absmax per 64
    MEASURED[20] = dict(wrong_mse=wrong_mse, right_mse=right_mse, wrong_zeros=wrong_zeros,
                        right_zeros=right_zeros)
    assert wrong_mse > 10 * right_mse
    assert wrong_zeros > 0.99 and right_zeros < 0.2         # almost every weight became 0
    clean = rng.normal(0.0, 0.02, 4096).astype(np.float32)  # without outliers the gap is small
    one = np.mean((quantize_nf4(clean, clean.size, False).dequantize() - clean) ** 2)
    blocks = np.mean((quantize_nf4(clean, 64, False).dequantize() - clean) ** 2)
    assert one < 2 * blocks


# ==== 21. fan-in / fan-out transposition when loading weights =========================
def test_21_fan_in_fan_out_transposition():
    rng = np.random.default_rng(0)
    D = CFG.d_model
    x = rng.standard_normal((2, 3, D))
    conv1d_q = rng.standard_normal((D, D))                  # Hugging Face GPT-2 Conv1D: (in, out)
    conv1d_fc = rng.standard_normal((D, 4 * D))             # y = x @ W, no transpose
    model = base_model()
    q = model.get_submodule("layers.0.self_attn.q_proj")

    copy_into(model, {"layers.0.self_attn.q_proj.weight": conv1d_q})    # the mistake (square)
    assert np.abs(q(x) - (x @ conv1d_q + q.bias)).max() > 1e-2          # silently wrong
    with pytest.raises(ValueError, match=r"fc1.weight: shape \(16, 64\)"):  # non-square: caught
        copy_into(model, {"layers.0.mlp.fc1.weight": conv1d_fc})

    copy_into(model, {"layers.0.self_attn.q_proj.weight": conv1d_q.T,   # the fix: transpose
                      "layers.0.mlp.fc1.weight": conv1d_fc.T})
    np.testing.assert_allclose(q(x), x @ conv1d_q + q.bias, rtol=1e-12)

    # the same trap when merging LoRA into an (in, out) weight (peft's fan_in_fan_out=True)
    lora = LoRALayer(D, D, rank=2, alpha=4, init_lora_weights=False, dtype=np.float64)
    trained = x @ conv1d_q + lora.delta(x)
    wrong_merge, right_merge = conv1d_q + lora.delta_weight(), conv1d_q + lora.delta_weight().T
    assert np.abs(x @ wrong_merge - trained).max() > 1e-2
    np.testing.assert_allclose(x @ right_merge, trained, rtol=1e-12, atol=1e-12)


# ==== 22. forgetting zero_grad between steps ==========================================
def test_22_forgetting_zero_grad_accumulates():
    tokens, targets = batch()
    model = get_peft_model(base_model(), LoraConfig(r=2, lora_alpha=4))
    randomise_lora_B(model)
    name = "layers.0.self_attn.q_proj.lora.A"

    def grad_after(steps, zero_each_time):
        model.zero_grad()
        for _ in range(steps):
            if zero_each_time:
                model.zero_grad()
            _, d = cross_entropy(model.forward(tokens), targets)
            model.backward(d)
        return model.get_grad(name).copy()

    once = grad_after(1, True)
    np.testing.assert_allclose(grad_after(3, False), 3 * once, rtol=1e-12)   # the mistake
    np.testing.assert_allclose(grad_after(3, True), once, rtol=1e-12)        # the fix
    assert np.abs(once).max() > 1e-6

    rng = np.random.default_rng(0)                          # the course's standalone layer sets
    W, x, G = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 5))
    lora = LoRALayer(4, 5, rank=2, alpha=4.0, rng=rng, dtype=np.float64)
    lora.B = rng.standard_normal((5, 2))
    grads = []
    for _ in range(3):                                      # the course's loop: no zeroing
        lora.forward(x, W)
        lora.backward(G)
        grads.append(lora.A_grad.copy())
    assert np.abs(grads[0]).max() > 1e-6
    np.testing.assert_array_equal(grads[2], grads[0])       # the same gradient every time


# ==== 23. data-parallel training in a script without a main guard ======================
def test_23_data_parallel_script_needs_a_main_guard(tmp_path):
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # code/stage-09
    body = """
import numpy as np
from minigpt import GPT, GPTConfig
from tasks import VOCAB_SIZE, make_examples
from train import train
{guard}
    cfg = GPTConfig(vocab_size=VOCAB_SIZE, context_length=12, d_model=16, n_layers=1, n_heads=2)
    data = make_examples("copy", 32, seed=0, max_len=4)
    losses = [train(GPT(cfg), data, steps=2, batch_size=8, progress=False, processes=p)["losses"][-1]
              for p in (1, 2)]
    print("losses", *losses)
"""

    def run(guard):
        script = tmp_path / ("guarded.py" if guard else "unguarded.py")
        script.write_text(body.format(guard='if __name__ == "__main__":' if guard else "if True:"))
        env = {**os.environ, "PYTHONPATH": here}
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=env, timeout=120)

    wrong = run(guard=False)                                # the mistake
    assert wrong.returncode != 0
    assert "exited with code 1 before it started" in wrong.stderr
    assert "if __name__ == '__main__':" in wrong.stderr
    right = run(guard=True)                                 # the fix
    assert right.returncode == 0, right.stderr
    one, two = (float(v) for v in right.stdout.split()[1:3])
    assert abs(one - two) <= 1e-5 * one
