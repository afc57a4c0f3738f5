"""The two-proportion z-test and the A/B verdict, against values worked out by hand (normal table lookups)."""

from __future__ import annotations

import math

import pytest

from review.stats import Arm, two_proportion_z_test, verdict


def test_z_test_matches_hand_computation() -> None:
    # A: 200 clicks / 1000, B: 150 / 1000.  pooled p = 350/2000 = 0.175
    # se = sqrt(0.175 * 0.825 * (1/1000 + 1/1000)) = sqrt(0.00028875) = 0.0169926
    # z = (0.20 - 0.15) / 0.0169926 = 2.94245;  Phi(2.9425) = 0.998372 -> two-sided p = 2 * 0.001628 = 0.003256
    t = two_proportion_z_test(200, 1000, 150, 1000)
    assert t.rate_a == pytest.approx(0.20) and t.rate_b == pytest.approx(0.15)
    assert t.z == pytest.approx(2.94245, abs=1e-5)
    assert t.p_value == pytest.approx(0.003256, abs=2e-6)
    assert t.lift == pytest.approx(1 / 3)  # (0.20 - 0.15) / 0.15


def test_z_test_small_difference_is_not_significant() -> None:
    # 30/1000 vs 25/1000: pooled 0.0275, se = sqrt(0.0275 * 0.9725 * 0.002) = 0.00731351, z = 0.005 / 0.00731351 = 0.68367
    # Phi(0.68367) = 0.75291 -> p = 2 * 0.24709 = 0.49418
    t = two_proportion_z_test(30, 1000, 25, 1000)
    assert t.z == pytest.approx(0.68367, abs=1e-5)
    assert t.p_value == pytest.approx(0.49418, abs=2e-5)
    assert t.lift == pytest.approx(0.2)


def test_z_test_is_antisymmetric_and_handles_degenerate_data() -> None:
    ab, ba = two_proportion_z_test(200, 1000, 150, 1000), two_proportion_z_test(150, 1000, 200, 1000)
    assert ba.z == pytest.approx(-ab.z) and ba.p_value == pytest.approx(ab.p_value)
    # No clicks anywhere (or all clicks): no variance, no evidence.
    assert two_proportion_z_test(0, 500, 0, 800).p_value == 1.0
    assert two_proportion_z_test(10, 10, 20, 20).p_value == 1.0
    assert two_proportion_z_test(5, 100, 0, 100).lift is None  # relative lift over a zero rate is undefined
    # Unequal group sizes: 45/900 vs 30/1100 -> p1 = .05, p2 = .027273, pooled = 75/2000 = .0375
    # se = sqrt(.0375 * .9625 * (1/900 + 1/1100)) = sqrt(.036094 * .0020202) = .0085391; z = .022727 / .0085391 = 2.6615
    t = two_proportion_z_test(45, 900, 30, 1100)
    assert t.z == pytest.approx(2.6615, abs=2e-4)
    assert t.p_value == pytest.approx(math.erfc(2.6615 / math.sqrt(2)), abs=1e-4)  # ~0.00778


@pytest.mark.parametrize("args", [(1, 0, 1, 10), (11, 10, 1, 10), (-1, 10, 1, 10)])
def test_z_test_rejects_impossible_counts(args) -> None:
    with pytest.raises(ValueError):
        two_proportion_z_test(*args)


def test_verdict_names_a_significant_winner() -> None:
    v = verdict([Arm("A", 200, 1000), Arm("B", 150, 1000)], confidence=0.95)
    assert v.winner == "A" and v.leader == "A" and v.runner_up == "B"
    assert v.p_value == pytest.approx(0.003256, abs=2e-6)
    assert v.lift == pytest.approx(1 / 3)
    # The same data at 99.9 % confidence is not enough.
    strict = verdict([Arm("A", 200, 1000), Arm("B", 150, 1000)], confidence=0.999)
    assert strict.winner is None and strict.leader == "A" and "not significant" in strict.reason


def test_verdict_without_enough_evidence_or_groups() -> None:
    assert verdict([Arm("A", 30, 1000), Arm("B", 25, 1000)], 0.95).winner is None
    assert verdict([Arm("A", 30, 1000)], 0.95).reason == "needs results for at least two groups"
    assert verdict([Arm("A", 30, 1000), Arm("B", 0, 0)], 0.95).winner is None
    tied = verdict([Arm("B", 50, 1000), Arm("A", 50, 1000)], 0.95)
    assert tied.winner is None and tied.leader == "A" and "tied" in tied.reason  # ties ordered by name


def test_verdict_with_three_groups_uses_bonferroni() -> None:
    # A 336/3000 = .112 vs B 285/3000 = .095: pooled 621/6000 = .1035,
    # se = sqrt(.1035 * .8965 * 2/3000) = sqrt(.0000618585) = .0078650, z = .017 / .0078650 = 2.1615,
    # Phi(2.1615) = .98467 -> p = 2 * .01533 = .03066. With two groups (alpha .05) A wins; with a third group each
    # comparison is held to alpha .025, and .03066 is not enough.
    two = verdict([Arm("A", 336, 3000), Arm("B", 285, 3000)], 0.95)
    assert two.winner == "A" and two.p_value == pytest.approx(0.03066, abs=5e-5)
    three = verdict([Arm("A", 336, 3000), Arm("B", 285, 3000), Arm("C", 100, 3000)], 0.95)
    assert three.winner is None and three.alpha == pytest.approx(0.025)
    assert three.p_value == pytest.approx(0.03066, abs=5e-5)


def test_verdict_checks_confidence() -> None:
    with pytest.raises(ValueError):
        verdict([Arm("A", 1, 2), Arm("B", 1, 2)], confidence=1.0)


def test_results_table_sums_groups_per_row_and_channel() -> None:
    import pandas as pd

    from review.results import _VIEW_COLUMNS, _summarise

    rows = [  # as the query orders them: row_key, row, channel, group (no group first), asset
        (7, "hero-01", "banner", None, 1, 500, 9, 1),
        (7, "hero-01", "banner", "A", 2, 1000, 200, 5),
        (7, "hero-01", "banner", "A", 4, 1000, 100, 0),
        (7, "hero-01", "banner", "B", 3, 1000, 150, 2),
        (7, "hero-01", "story", "", 5, 10, 1, 0),
        (3, "teaser", "banner", "B", 6, 100, 1, 1),
    ]
    tests = _summarise(pd.DataFrame(rows, columns=_VIEW_COLUMNS), confidence=0.95, metric="ctr")
    assert [(t.row_id, t.row_key, t.channel, t.ungrouped_assets) for t in tests] == [
        (7, "hero-01", "banner", 1), (7, "hero-01", "story", 1), (3, "teaser", "banner", 0)]
    a, b = tests[0].groups
    assert (a.name, a.asset_ids, a.impressions, a.clicks, a.conversions) == ("A", [2, 4], 2000, 300, 5)
    assert (b.name, b.asset_ids, b.impressions, b.clicks, b.conversions) == ("B", [3], 1000, 150, 2)
    assert all(type(v) is int for v in (tests[0].row_id, a.impressions, a.clicks, *a.asset_ids))
    assert tests[0].verdict == verdict([Arm("A", 300, 2000), Arm("B", 150, 1000)], 0.95)
    assert tests[1].groups == [] and tests[1].verdict.reason == "needs results for at least two groups"
    assert _summarise(pd.DataFrame([], columns=_VIEW_COLUMNS), confidence=0.95, metric="ctr") == []


def test_results_table_sums_do_not_wrap_near_2_63() -> None:
    """Counts stored before the import capped them: each fits a signed 64-bit integer, their sum does not."""
    import pandas as pd

    from review.results import _VIEW_COLUMNS, _summarise

    big = 2**62
    rows = [(7, "hero-01", "banner", "A", 1, big, big // 2, 0), (7, "hero-01", "banner", "A", 2, big, big // 2, 0),
            (7, "hero-01", "banner", "B", 3, 3 * big, big, 0)]
    [test] = _summarise(pd.DataFrame(rows, columns=_VIEW_COLUMNS), confidence=0.95, metric="ctr")
    a, b = test.groups
    assert (a.impressions, a.clicks, b.impressions) == (2**63, 2**62, 3 * 2**62)
    assert a.rate("ctr") == 0.5 and test.verdict.leader == "A"
