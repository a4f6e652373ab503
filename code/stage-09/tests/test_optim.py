"""SGD, AdamW, parameter groups and clipping against hand-computed references."""
import numpy as np
import pytest

from nn import Linear, Module
from optim import SGD, AdamW, clip_grad_norm, warmup_cosine


class TwoLayer(Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.fc1 = Linear(3, 4, rng=rng, dtype=np.float64)
        self.fc2 = Linear(4, 2, rng=rng, dtype=np.float64)


def set_grads(model, rng):
    for name, p in model.named_parameters(trainable_only=True):
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path), attr + "_grad", rng.standard_normal(p.shape))


def grads_of(model):
    return {n: model.get_grad(n).copy() for n, _ in model.named_parameters(trainable_only=True)}


def adamw_reference(p, grads, lr, b1, b2, eps, wd):
    """Loshchilov & Hutter, Algorithm 2 (torch.optim.AdamW), one parameter, written out."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_adamw_first_steps_by_hand():
    """One scalar, numbers worked on paper: bias correction makes step 1 lr*sign(g) (up to eps)."""
    model = Module()
    model.param_names = ("w",)
    model.w = np.array([1.0])
    opt = AdamW(model, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    model.w_grad = np.array([0.5])
    opt.step()
    # decay: 1 - 0.1*0.01 = 0.999; m_hat = 0.5, v_hat = 0.25, step = 0.1*0.5/0.5 = 0.1
    w1 = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8)
    assert model.w[0] == pytest.approx(w1, abs=1e-15)
    model.w_grad = np.array([-1.0])
    opt.step()
    # m = -0.055, v = 0.00124975; m_hat = -0.055/0.19, v_hat = 0.00124975/0.001999
    expected = w1 * 0.999 + 0.1 * (0.055 / 0.19) / (np.sqrt(0.00124975 / 0.001999) + 1e-8)
    assert model.w[0] == pytest.approx(expected, abs=1e-12)


def test_adamw_matches_reference_for_several_steps():
    model, rng = TwoLayer(), np.random.default_rng(1)
    start = {n: p.copy() for n, p in model.named_parameters()}
    opt = AdamW(model, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    history = []
    for _ in range(4):
        set_grads(model, rng)
        history.append(grads_of(model))
        opt.step()
    for name, p in model.named_parameters():
        ref = adamw_reference(start[name], [h[name] for h in history], 0.01, 0.8, 0.99, 1e-6, 0.1)
        np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-14)


def test_adamw_and_sgd_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    for make_ours, make_torch in [
        (lambda m: AdamW(m, lr=0.05, betas=(0.9, 0.95), weight_decay=0.2),
         lambda p: torch.optim.AdamW([p], lr=0.05, betas=(0.9, 0.95), weight_decay=0.2)),
        (lambda m: SGD(m, lr=0.05, momentum=0.9, weight_decay=0.1),
         lambda p: torch.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=0.1)),
    ]:
        model = TwoLayer(seed=3)
        tp = torch.tensor(model.fc1.weight.copy(), requires_grad=True)
        model.fc2.freeze()
        model.fc1.requires_grad_(False, ["bias"])
        ours, theirs = make_ours(model), make_torch(tp)
        for g in grads:
            model.fc1.weight_grad = g.copy()
            tp.grad = torch.tensor(g)
            ours.step()
            theirs.step()
        np.testing.assert_allclose(model.fc1.weight, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_sgd_momentum_reference():
    model, rng = TwoLayer(), np.random.default_rng(4)
    p0 = model.fc2.weight.copy()
    opt = SGD(model, lr=0.1, momentum=0.5, weight_decay=0.01)
    p, buf = p0.copy(), np.zeros_like(p0)
    for _ in range(3):
        set_grads(model, rng)
        g = model.fc2.weight_grad + 0.01 * p
        buf = 0.5 * buf + g
        p = p - 0.1 * buf
        opt.step()
    np.testing.assert_allclose(model.fc2.weight, p, rtol=1e-12)


def test_param_groups_get_their_own_lr_and_weight_decay():
    """LoRA+ style: one group at 16x the learning rate of the other."""
    model, rng = TwoLayer(), np.random.default_rng(5)
    groups = [{"names": ["fc1.weight", "fc1.bias"], "lr": 0.001},
              {"names": ["fc2.weight", "fc2.bias"], "lr": 0.016, "weight_decay": 0.5}]
    start = {n: p.copy() for n, p in model.named_parameters()}
    opt = AdamW(model, lr=123.0, weight_decay=0.0, param_groups=groups)
    set_grads(model, rng)
    g = grads_of(model)
    opt.step()
    for name, p in model.named_parameters():
        lr, wd = (0.001, 0.0) if name.startswith("fc1") else (0.016, 0.5)
        ref = adamw_reference(start[name], [g[name]], lr, 0.9, 0.999, 1e-8, wd)
        np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert [grp["lr"] for grp in opt.param_groups] == [0.001, 0.016]


def test_frozen_parameters_have_no_state_and_never_change():
    model, rng = TwoLayer(), np.random.default_rng(6)
    model.fc1.freeze()
    frozen = {n: p.copy() for n, p in model.named_parameters() if n.startswith("fc1")}
    opt = AdamW(model, lr=0.1, weight_decay=0.5)
    assert set(opt.state) == {"fc2.weight", "fc2.bias"}
    trainable_bytes = model.fc2.weight.nbytes + model.fc2.bias.nbytes
    assert opt.state_nbytes() == 2 * trainable_bytes        # m and v
    for _ in range(3):
        x = rng.standard_normal((5, 3))
        opt.zero_grad()
        model.fc2.backward(model.fc2.forward(model.fc1.forward(x)))
        model.fc1.backward(rng.standard_normal((5, 4)))
        opt.step()
    for name, before in frozen.items():
        assert np.array_equal(model.get_parameter(name), before)   # bit for bit
        assert model.get_grad(name) is None


def test_sgd_state_only_with_momentum():
    model = TwoLayer()
    assert SGD(model, lr=0.1).state_nbytes() == 0
    assert SGD(model, lr=0.1, momentum=0.9).state_nbytes() == sum(p.nbytes for p in model.parameters())


def test_step_skips_missing_grads_and_follows_reassigned_arrays():
    model, rng = TwoLayer(), np.random.default_rng(7)
    opt = SGD(model, lr=1.0)
    model.zero_grad()
    model.fc1.weight_grad = None                           # e.g. unused this step
    before = model.fc1.weight.copy()
    model.fc2.weight = np.ones((2, 4))                     # a learner reassigns an array
    model.fc2.weight_grad = np.full((2, 4), 0.25)
    opt.step()
    assert np.array_equal(model.fc1.weight, before)
    np.testing.assert_allclose(model.fc2.weight, 0.75)


@pytest.mark.parametrize("groups, match", [
    ([{"names": ["fc1.weight"]}], "in no param group"),
    ([{"names": ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc9.weight"]}], "fc9.weight"),
    ([{"names": ["fc1.weight", "fc1.bias"]}, {"names": ["fc1.bias", "fc2.weight", "fc2.bias"]}],
     "'fc1.bias' is in param groups 0 and 1"),
    ([{"params": []}], "needs 'names'"),
])
def test_bad_param_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        AdamW(TwoLayer(), param_groups=groups)


def test_naming_a_frozen_parameter_is_an_error():
    model = TwoLayer()
    model.fc1.requires_grad_(False, ["bias"])
    with pytest.raises(ValueError, match="'fc1.bias' is frozen"):
        AdamW(model, param_groups=[{"names": ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]}])


def test_clip_grad_norm():
    model = TwoLayer()
    model.fc1.requires_grad_(False, ["bias"])
    model.zero_grad()
    model.fc1.weight_grad[...] = 3.0 / np.sqrt(12)         # norm 3
    model.fc2.weight_grad[...] = 4.0 / np.sqrt(8)          # norm 4 -> total 5
    assert clip_grad_norm(model, 10.0) == pytest.approx(5.0)
    assert model.fc1.weight_grad[0, 0] == pytest.approx(3.0 / np.sqrt(12))   # untouched
    assert clip_grad_norm(model, 1.0) == pytest.approx(5.0)
    total = np.sqrt(sum(np.sum(g**2) for g in grads_of(model).values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(model.fc1.weight_grad / model.fc2.weight_grad[0, 0],
                               (3.0 / np.sqrt(12)) / (4.0 / np.sqrt(8)), rtol=1e-12)  # direction kept


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, warmup_steps=10, min_scale=0.1) == pytest.approx(0.1)
    model = TwoLayer()
    opt = SGD(model, lr=0.5)
    opt.set_lr_scale(0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
