"""SelectiveConfig validation and serialisation; resolve_config precedence."""

import dataclasses
import json
import math

import pytest

from selact.amu import STRATEGIES
from selact.config import BUDGETS, GRANULARITIES, SelectiveConfig, resolve_config

# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, 1.0000001, math.nan, math.inf, -math.inf])
def test_density_out_of_range_is_a_value_error(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        SelectiveConfig(density=density)


@pytest.mark.parametrize("density", [True, False, "0.5", None, [0.5]])
def test_density_of_wrong_type_is_a_type_error(density):
    with pytest.raises(TypeError, match="density must be a number"):
        SelectiveConfig(density=density)


@pytest.mark.parametrize("density", [1, 1.0, 0.5, 1e-6])
def test_valid_densities_are_accepted(density):
    assert SelectiveConfig(density=density).density == density


@pytest.mark.parametrize("key_density", [0, -0.5, 2.0, math.nan])
def test_key_density_is_validated_like_density(key_density):
    with pytest.raises(ValueError, match="key_density"):
        SelectiveConfig(key_density=key_density)


def test_key_density_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="key_density"):
        SelectiveConfig(key_density="0.3")


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown strategy 'sapx'") as info:
        SelectiveConfig(strategy="sapx")
    for name in STRATEGIES.names():
        assert name in str(info.value)
    for name in ("sapi", "sapw", "dense", "zero_skip", "random"):
        assert name in str(info.value)


def test_unknown_granularity_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown granularity 'row'") as info:
        SelectiveConfig(granularity="row")
    for name in GRANULARITIES:
        assert name in str(info.value)


def test_unknown_budget_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown budget 'quantile'") as info:
        SelectiveConfig(budget="quantile")
    for name in BUDGETS:
        assert name in str(info.value)


@pytest.mark.parametrize("block", [0, -8, True, 2.0, "8", None])
def test_block_must_be_a_positive_integer(block):
    with pytest.raises(ValueError, match="block must be a positive integer"):
        SelectiveConfig(granularity="block", block=block)


def test_block_one_is_accepted():
    assert SelectiveConfig(granularity="block", block=1).block == 1


# --- frozen, replace, serialisation -----------------------------------------------------------


def test_config_is_frozen():
    config = SelectiveConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.density = 0.25
    assert config.density == 0.5


def test_config_is_hashable_and_compares_by_value():
    assert SelectiveConfig(density=0.25) == SelectiveConfig(density=0.25)
    assert hash(SelectiveConfig(density=0.25)) == hash(SelectiveConfig(density=0.25))
    assert SelectiveConfig(density=0.25) != SelectiveConfig(density=0.5)


def test_replace_changes_fields_and_leaves_the_original():
    config = SelectiveConfig(strategy="sapw", density=0.3)
    changed = config.replace(density=0.7, granularity="channel")
    assert (changed.strategy, changed.density, changed.granularity) == ("sapw", 0.7, "channel")
    assert (config.density, config.granularity) == (0.3, "element")


def test_replace_validates():
    with pytest.raises(ValueError, match="density"):
        SelectiveConfig().replace(density=0.0)
    with pytest.raises(ValueError, match="unknown strategy"):
        SelectiveConfig().replace(strategy="nope")


CONFIGS = [
    SelectiveConfig(),
    SelectiveConfig(
        strategy="sapw",
        density=0.35,
        granularity="block",
        block=4,
        budget="threshold",
        key_density=0.25,
        counting=False,
        check_finite=False,
        backend="reference",
    ),
    SelectiveConfig(strategy="zero_skip", density=1, granularity="batch_shared"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_to_dict_from_dict_round_trip(config):
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(SelectiveConfig)}
    assert data["density"] == config.density
    assert SelectiveConfig.from_dict(data) == config


@pytest.mark.parametrize("config", CONFIGS)
def test_to_json_round_trip(config):
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    assert SelectiveConfig.from_dict(json.loads(text)) == config


def test_from_dict_fills_missing_fields_with_defaults():
    assert SelectiveConfig.from_dict({"density": 0.25}) == SelectiveConfig(density=0.25)


def test_from_dict_rejects_unknown_fields_by_name():
    with pytest.raises(ValueError, match="unknown SelectiveConfig fields: densty, foo"):
        SelectiveConfig.from_dict({"densty": 0.25, "foo": 1, "strategy": "sapi"})


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="density"):
        SelectiveConfig.from_dict({"density": 2.0})


# --- resolve_config ---------------------------------------------------------------------------

DEFAULT = SelectiveConfig(strategy="sapi", density=0.5)


@pytest.mark.parametrize("overrides", [None, {}])
def test_no_overrides_gives_the_default(overrides):
    assert resolve_config("features.3", DEFAULT, overrides) is DEFAULT


def test_unmatched_name_gives_the_default():
    overrides = {"features.4": {"density": 0.1}, r"re:head\..*": None}
    assert resolve_config("features.3", DEFAULT, overrides) is DEFAULT


def test_exact_name_beats_regex_even_when_the_regex_comes_first():
    overrides = {r"re:features\.\d+": {"density": 0.1}, "features.3": {"density": 0.9}}
    assert resolve_config("features.3", DEFAULT, overrides).density == 0.9
    assert resolve_config("features.4", DEFAULT, overrides).density == 0.1


def test_first_matching_regex_in_mapping_order_wins():
    first = {r"re:features\..*": {"density": 0.1}, r"re:features\.3": {"density": 0.9}}
    second = {r"re:features\.3": {"density": 0.9}, r"re:features\..*": {"density": 0.1}}
    assert resolve_config("features.3", DEFAULT, first).density == 0.1
    assert resolve_config("features.3", DEFAULT, second).density == 0.9


def test_regex_must_match_the_whole_name():
    overrides = {r"re:features\.1": {"density": 0.1}}
    # A prefix, suffix or inner match is not enough.
    assert resolve_config("features.10", DEFAULT, overrides) is DEFAULT
    assert resolve_config("block.features.1", DEFAULT, overrides) is DEFAULT
    assert resolve_config("features.1", DEFAULT, overrides).density == 0.1


def test_exact_key_is_not_a_regex():
    # "a.b" as an exact key must not match "aXb" although "." matches any character as a regex.
    assert resolve_config("aXb", DEFAULT, {"a.b": {"density": 0.1}}) is DEFAULT


def test_mapping_value_changes_fields_on_the_default():
    default = SelectiveConfig(strategy="sapw", density=0.5, granularity="block", block=4)
    config = resolve_config("fc", default, {"fc": {"density": 0.25, "budget": "threshold"}})
    assert config == default.replace(density=0.25, budget="threshold")
    assert (config.strategy, config.granularity, config.block) == ("sapw", "block", 4)


def test_config_value_replaces_the_default():
    other = SelectiveConfig(strategy="random", density=0.2)
    assert resolve_config("fc", DEFAULT, {"fc": other}) is other
    assert resolve_config("fc", DEFAULT, {"re:f.": other}) is other


def test_none_means_skip():
    assert resolve_config("fc", DEFAULT, {"fc": None}) is None
    assert resolve_config("fc", DEFAULT, {"re:.*": None}) is None


def test_exact_none_beats_matching_regex():
    assert resolve_config("fc", DEFAULT, {"re:.*": {"density": 0.1}, "fc": None}) is None


def test_invalid_override_value_is_a_type_error():
    with pytest.raises(TypeError, match="override must be"):
        resolve_config("fc", DEFAULT, {"fc": 0.25})


def test_invalid_override_field_is_reported():
    with pytest.raises(ValueError, match="density"):
        resolve_config("fc", DEFAULT, {"fc": {"density": 0}})
    with pytest.raises(TypeError):
        resolve_config("fc", DEFAULT, {"fc": {"densty": 0.25}})
