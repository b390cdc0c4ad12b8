"""scoring.config: knobs, parsing, ranges, cross-checks and the fall-back to defaults."""

from __future__ import annotations

import math

import pytest

from scoring.config import CHECKS, PARAMS, Config, Param, _cross_check, validate_change

# ---------------------------------------------------------------------------------------------
# defaults


def test_defaults_pass_every_cross_check() -> None:
    cfg = Config.defaults()
    _cross_check(cfg.as_dict())  # raises on a contradiction
    assert cfg.errors == ()
    assert cfg.version == 0


def test_every_default_parses_back_to_itself() -> None:
    for name, p in PARAMS.items():
        is_bool = isinstance(p.default, bool)
        text = ("true" if p.default else "false") if is_bool else str(p.default)
        assert p.parse(text) == p.default, name


def test_defaults_are_within_their_own_bounds() -> None:
    for name, p in PARAMS.items():
        if p.lo is not None:
            assert p.default >= p.lo, name
        if p.hi is not None:
            assert p.default <= p.hi, name
        if p.kind == "choice":
            assert p.default in p.choices, name


def test_documented_keys_exist() -> None:
    for key in ("enabled", "divert_threshold", "reject_threshold", "reject_code",
                "score_header", "rate.short_window", "rate.long_window", "sweep.recent"):
        assert key in PARAMS
    for check in CHECKS:
        assert f"weight.{check}" in PARAMS


def test_default_values() -> None:
    cfg = Config.defaults()
    assert cfg["enabled"] is True
    assert cfg.get_float("divert_threshold") == 0.3
    assert cfg.get_float("reject_threshold") == 0.7
    assert cfg["reject_code"] == "603"
    assert cfg["score_header"] == "X-Spitwall-Score"
    assert cfg.rate_windows == (10, 300)
    assert cfg.weight("scanner") == 1.0
    assert cfg.weight("no_such_check") == 0.0


def test_every_ramp_has_soft_below_hard() -> None:
    for name in PARAMS:
        if name.endswith(".soft"):
            hard = name[: -len(".soft")] + ".hard"
            assert hard in PARAMS
            assert PARAMS[name].default < PARAMS[hard].default


# ---------------------------------------------------------------------------------------------
# parsing each kind


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), (" on ", True),
    ("false", False), ("0", False), ("No", False), ("off", False),
])
def test_parse_bool(text: str, expected: bool) -> None:
    assert PARAMS["enabled"].parse(text) is expected


@pytest.mark.parametrize("text", ["", "2", "tru", "enabled", "none"])
def test_parse_bool_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"^enabled: invalid value"):
        PARAMS["enabled"].parse(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0.0), ("0.5", 0.5), (" 1 ", 1.0), ("1e-1", 0.1), ("1.0", 1.0),
])
def test_parse_float(text: str, expected: float) -> None:
    assert PARAMS["divert_threshold"].parse(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "0,5", "nan", "NaN"])
def test_parse_float_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"^divert_threshold: invalid value"):
        PARAMS["divert_threshold"].parse(text)


@pytest.mark.parametrize(("key", "text", "word"), [
    ("divert_threshold", "1.01", "above the maximum"),
    ("divert_threshold", "-0.1", "below the minimum"),
    ("divert_threshold", "inf", "above the maximum"),
    ("reject_threshold", "-inf", "below the minimum"),
    ("weight.sweep", "10.5", "above the maximum"),
    ("weight.scanner", "-1", "below the minimum"),
    ("rate.short_window", "0", "below the minimum"),
    ("rate.short_window", "3601", "above the maximum"),
    ("sweep.recent", "4", "below the minimum"),
    ("sweep.recent", "101", "above the maximum"),
    ("distinct.window", "9", "below the minimum"),
    ("sweep.sequential_min", "2", "below the minimum"),
    ("rate_ip.short.soft", "-1", "below the minimum"),
])
def test_out_of_range_refused_naming_the_key(key: str, text: str, word: str) -> None:
    with pytest.raises(ValueError) as err:
        PARAMS[key].parse(text)
    msg = str(err.value)
    assert msg.startswith(f"{key}: ")
    assert word in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("text", "expected"), [("10", 10), (" 42 ", 42), ("3600", 3600)])
def test_parse_int(text: str, expected: int) -> None:
    value = PARAMS["rate.short_window"].parse(text)
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize("text", ["1.5", "ten", "", "0x10", "1e3"])
def test_parse_int_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"^rate\.short_window: invalid value"):
        PARAMS["rate.short_window"].parse(text)


@pytest.mark.parametrize(("text", "expected"), [("603", "603"), ("608", "608"), (" 608 ", "608")])
def test_parse_choice(text: str, expected: str) -> None:
    assert PARAMS["reject_code"].parse(text) == expected


@pytest.mark.parametrize("text", ["486", "", "6O3", "603 608"])
def test_parse_choice_refuses_and_lists_choices(text: str) -> None:
    with pytest.raises(ValueError, match=r"reject_code: invalid value.*603, 608"):
        PARAMS["reject_code"].parse(text)


@pytest.mark.parametrize("text", ["drop", "Reject", "IGNORE"])
def test_parse_scanner_non_invite(text: str) -> None:
    assert PARAMS["scanner.non_invite"].parse(text) == text.lower()


@pytest.mark.parametrize(("text", "expected"), [
    ("X-Spam-Score", "X-Spam-Score"), ("", ""), ("  ", ""), (" X-Score ", "X-Score"),
])
def test_parse_header(text: str, expected: str) -> None:
    assert PARAMS["score_header"].parse(text) == expected


@pytest.mark.parametrize("text", ["X Score", "X-Score:", "X-Score\r\nEvil: 1", "-X", "A" * 65,
                                  "Ü-Score"])
def test_parse_header_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"^score_header: invalid value"):
        PARAMS["score_header"].parse(text)


def test_parse_refuses_non_text() -> None:
    with pytest.raises(ValueError, match=r"^enabled: expected text"):
        PARAMS["enabled"].parse(1)  # type: ignore[arg-type]


def test_str_param_passes_text_through() -> None:
    p = Param("x", "str", "", "help")
    assert p.parse(" any ") == " any "


# ---------------------------------------------------------------------------------------------
# validate_change: typos, ranges and cross-checks


def test_validate_change_returns_parsed_value() -> None:
    assert validate_change({}, "divert_threshold", "0.4") == 0.4
    assert validate_change({}, "enabled", "off") is False


@pytest.mark.parametrize("key", ["divert_treshold", "weight.rate_ipp", "Enabled", "", "x" * 300])
def test_unknown_key_refused_naming_it(key: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_change({}, key, "1")
    assert f"unknown config key {key!r}" in str(err.value)


def test_unknown_key_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"did you mean weight\.sweep"):
        validate_change({}, "weights.sweep", "1")


def test_divert_above_reject_refused() -> None:
    with pytest.raises(ValueError, match=r"divert_threshold \(0\.8\) must not exceed "
                                         r"reject_threshold \(0\.7\)"):
        validate_change({}, "divert_threshold", "0.8")


def test_reject_below_divert_refused_against_stored_value() -> None:
    with pytest.raises(ValueError, match="must not exceed reject_threshold"):
        validate_change({"divert_threshold": "0.5"}, "reject_threshold", "0.4")


def test_divert_equal_to_reject_allowed() -> None:
    assert validate_change({}, "divert_threshold", "0.7") == 0.7


@pytest.mark.parametrize(("key", "text"), [
    ("sweep.soft", "30"), ("sweep.soft", "31"), ("sweep.hard", "8"),
    ("rate_ip.short.soft", "20"), ("distinct_callers.hard", "2"),
])
def test_soft_not_below_hard_refused(key: str, text: str) -> None:
    stem = key.rsplit(".", 1)[0]
    with pytest.raises(ValueError, match=rf"{stem}\.soft .* must be below {stem}\.hard"):
        validate_change({}, key, text)


def test_soft_just_below_hard_allowed() -> None:
    assert validate_change({}, "sweep.soft", "29.5") == 29.5


@pytest.mark.parametrize(("key", "text"), [("rate.short_window", "300"),
                                           ("rate.long_window", "10"),
                                           ("rate.long_window", "5")])
def test_short_window_must_be_shorter(key: str, text: str) -> None:
    with pytest.raises(ValueError, match=r"rate\.short_window must be shorter"):
        validate_change({}, key, text)


def test_validate_change_out_of_range_names_key() -> None:
    with pytest.raises(ValueError, match=r"^weight\.scanner: 11\.0 is above the maximum 10"):
        validate_change({}, "weight.scanner", "11")


# ---------------------------------------------------------------------------------------------
# Config.from_raw: what a Kamailio child does with whatever is in Redis


def test_from_raw_parses_overrides_and_keeps_version() -> None:
    cfg = Config.from_raw({"divert_threshold": "0.4", "enabled": "false",
                           "weight.sweep": "2", "rate.short_window": "5"}, version=12)
    assert cfg.errors == ()
    assert cfg.version == 12
    assert cfg["enabled"] is False
    assert cfg.get_float("divert_threshold") == 0.4
    assert cfg.weight("sweep") == 2.0
    assert cfg.rate_windows == (5, 300)


def test_from_raw_garbage_falls_back_to_defaults_and_reports() -> None:
    raw = {"divert_threshold": "lots", "weight.sweep": "99", "no.such.key": "1",
           "enabled": "maybe", "reject_code": "404", "sweep.recent": "2.5"}
    cfg = Config.from_raw(raw)
    defaults = Config.defaults().as_dict()
    assert cfg.as_dict() == defaults
    assert len(cfg.errors) == 6
    joined = "\n".join(cfg.errors)
    for key in ("divert_threshold", "weight.sweep", "no.such.key", "enabled", "reject_code",
                "sweep.recent"):
        assert key in joined


def test_from_raw_keeps_valid_entries_next_to_bad_ones() -> None:
    cfg = Config.from_raw({"weight.sweep": "bad", "weight.scanner": "3"})
    assert cfg.weight("sweep") == 0.5
    assert cfg.weight("scanner") == 3.0
    assert len(cfg.errors) == 1


def test_from_raw_contradicting_thresholds_reset_to_defaults() -> None:
    cfg = Config.from_raw({"divert_threshold": "0.9", "reject_threshold": "0.5",
                           "sweep.soft": "1", "weight.sweep": "3"})
    assert cfg.get_float("divert_threshold") == 0.3
    assert cfg.get_float("reject_threshold") == 0.7
    assert cfg.get_float("sweep.soft") == 8.0  # ramps are reset too
    assert cfg.weight("sweep") == 3.0  # weights are not thresholds: kept
    assert len(cfg.errors) == 1
    assert "divert_threshold (0.9) must not exceed" in cfg.errors[0]
    assert "using defaults" in cfg.errors[0]
    _cross_check(cfg.as_dict())


def test_from_raw_soft_above_hard_resets_ramps() -> None:
    cfg = Config.from_raw({"rate_ip.long.soft": "500"})
    assert cfg.get_float("rate_ip.long.soft") == 60.0
    assert any("rate_ip.long.soft" in e for e in cfg.errors)


def test_from_raw_windows_contradiction_resets_windows() -> None:
    cfg = Config.from_raw({"rate.short_window": "600"})
    assert cfg.rate_windows == (10, 300)
    assert cfg.errors


def test_from_raw_empty_is_defaults() -> None:
    cfg = Config.from_raw({}, 3)
    assert cfg.as_dict() == Config.defaults().as_dict()
    assert cfg.errors == ()


def test_as_dict_is_a_copy() -> None:
    cfg = Config.defaults()
    d = cfg.as_dict()
    d["enabled"] = False
    assert cfg["enabled"] is True


def test_float_bounds_reject_huge_counts() -> None:
    with pytest.raises(ValueError, match="above the maximum"):
        PARAMS["sweep.hard"].parse("1e10")
    assert math.isclose(PARAMS["sweep.hard"].parse("1e9"), 1e9)
