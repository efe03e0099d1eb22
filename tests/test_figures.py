"""Figures at small sample sizes: calibration bins follow n, KM has a unit, censoring marks and a given threshold."""
import numpy as np
import pytest

import finetune.figures as figures


@pytest.fixture
def saved(monkeypatch):
    """Keep the figure instead of writing it, so its axes can be read back."""
    out = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: out.append(fig))
    return out


@pytest.mark.parametrize("n, bins", [(11, 2), (14, 2), (30, 3), (100, 5), (400, 10), (5000, 10)])
def test_calibration_bins_follow_n(n, bins):
    assert figures.calibration_bins(n) == bins


def test_quantile_bins_count_and_wilson_interval():
    prob = np.linspace(0.1, 0.9, 12)
    y = np.array([0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1])
    b = figures._quantile_bins(y, prob, 2)
    assert list(b["count"]) == [6, 6] and np.allclose(b["observed"], [1 / 6, 5 / 6])
    assert np.all(b["low"] < b["observed"]) and np.all(b["observed"] < b["high"])
    # Wilson interval of 1/6 (a textbook value: 0.030 .. 0.564)
    assert b["low"][0] == pytest.approx(0.0301, abs=1e-3) and b["high"][0] == pytest.approx(0.5635, abs=1e-3)


def test_calibration_plot_names_n_and_bins(saved, tmp_path):
    rng = np.random.default_rng(0)
    prob = rng.uniform(0, 1, 12)
    figures.plot_calibration((rng.uniform(size=12) < prob).astype(int), prob, tmp_path / "c.png")
    ax = saved[0].axes[0]
    assert "n=12" in ax.get_title()
    assert "2 quantile bins of 6" in ax.get_legend().get_texts()[1].get_text()


def _km_data():
    time = np.array([2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0])
    event = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
    risk = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    return time, event, risk


def test_km_time_unit_and_censor_marks(saved, tmp_path):
    time, event, risk = _km_data()
    figures.plot_km(time, event, risk, tmp_path / "k.png")
    ax = saved[0].axes[0]
    assert ax.get_xlabel() == "Time (months)"
    marks = [line for line in ax.get_lines() if line.get_marker() == "+" and len(line.get_xdata())]
    censored = sorted(x for line in marks for x in line.get_xdata())
    assert censored == [3.0, 11.0, 17.0]
    # Each mark sits on its curve: high-risk group (0.9..0.6) at t=3 after one event in 4 -> 0.75.
    high = next(line for line in marks if 3.0 in line.get_xdata())
    assert high.get_ydata()[0] == pytest.approx(0.75)
    figures.plot_km(time, event, risk, tmp_path / "k.png", time_unit="days")
    assert saved[1].axes[0].get_xlabel() == "Time (days)"


def test_km_threshold_fixed_elsewhere_cuts_the_groups(saved, tmp_path, monkeypatch):
    time, event, risk = _km_data()
    seen = []
    real = figures.km_by_risk_group
    monkeypatch.setattr(figures, "km_by_risk_group", lambda *a, cut: seen.append(cut) or real(*a, cut=cut))
    figures.plot_km(time, event, risk, tmp_path / "k.png")
    figures.plot_km(time, event, risk, tmp_path / "k.png", threshold=0.65)
    assert seen == ["median", 0.65]
    assert "median of these risks" in saved[0].axes[0].get_title()
    title = saved[1].axes[0].get_title()
    assert "> 0.65 (fixed threshold)" in title
    labels = [t.get_text() for t in saved[1].axes[0].get_legend().get_texts()]
    assert labels[0].startswith("low risk (n=5") and labels[1].startswith("high risk (n=3")


def test_figures_write_png(tmp_path):
    time, event, risk = _km_data()
    figures.plot_km(time, event, risk, tmp_path / "k.png", threshold=0.5)
    figures.plot_calibration([0, 1, 0, 1, 1], [0.1, 0.8, 0.3, 0.6, 0.9], tmp_path / "c.png")
    for name in ("k.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_calibration_with_all_negative_and_all_positive_bins(tmp_path):
    """k = 0 and k = m bins: the Wilson bound equals the observed fraction (the demo once crashed on a
    rounding error there: matplotlib refuses a negative error bar)."""
    from finetune.figures import _wilson, plot_calibration
    k, m = np.array([0.0, 5.0, 2.0]), np.array([5.0, 5.0, 7.0])
    low, high = _wilson(k, m)
    p = k / m
    assert (low <= p).all() and (high >= p).all() and low[0] == 0.0 and high[1] == 1.0
    y = np.array([0] * 6 + [1] * 6)
    prob = np.linspace(0.05, 0.95, 12)
    plot_calibration(y, prob, tmp_path / "cal.png")
    assert (tmp_path / "cal.png").stat().st_size > 0
