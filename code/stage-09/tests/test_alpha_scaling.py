"""alpha_scaling.py: the two schemes, the shared runs, the summaries, and a smoke run."""
import pytest

import alpha_scaling as al


def test_schemes_set_the_scaling():
    for r in al.RANKS:
        assert al.lora_alpha("alpha/r", r) / r == pytest.approx(al.ALPHA / r)
        assert al.lora_alpha("no scaling", r) / r == 1
    with pytest.raises(ValueError, match="scheme"):
        al.lora_alpha("other", 4)


def rows(scheme, ces):
    return [{"scheme": scheme, "rank": r, "lr": lr, "val_ce": ce}
            for (r, lr), ce in ces.items()]


def test_summaries():
    data = rows("alpha/r", {(2, 0.1): 1.0, (8, 0.1): 2.0, (2, 1.0): 3.0, (8, 1.0): 0.5}) + \
        rows("no scaling", {(2, 0.1): 0.1, (8, 0.1): 1.0, (2, 1.0): 1.0, (8, 1.0): 1.0})
    assert al.best_lrs(data) == {("alpha/r", 2): 0.1, ("alpha/r", 8): 1.0,
                                 ("no scaling", 2): 0.1, ("no scaling", 8): 0.1}
    assert al.best_lr_spread(data) == {"alpha/r": 10.0, "no scaling": 1.0}
    assert al.rank_sensitivity(data) == {"alpha/r": 6.0, "no scaling": 10.0}


@pytest.mark.slow
def test_quick_run_writes_runs_plot_and_readme(tmp_path):
    out = al.main(["--quick", "--out", str(tmp_path)])
    assert {(r["scheme"], r["rank"]) for r in out} == {(s, r) for s in al.SCHEMES for r in (2, 8)}
    assert all((tmp_path / f).exists() for f in ("runs.csv", "alpha_r.png", "README.md"))
    assert al.read_runs(tmp_path / "runs.csv")[0]["steps"] == 20
