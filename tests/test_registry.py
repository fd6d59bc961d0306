from dataclasses import dataclass

import pytest
from hydra.core.config_store import ConfigStore

from dgbench.errors import ConfigError
from dgbench.registry import Registry


@dataclass
class ToyConfig:
    name: str = "?"
    width: int = 3


def test_decorator_and_call_registration_store_the_config_node():
    registry = Registry("toykind")

    @registry.register("alpha", ToyConfig)
    class Alpha:
        pass

    def beta_factory():
        return "beta"

    assert registry.register("beta", ToyConfig, beta_factory) is beta_factory
    assert registry.get("alpha").obj is Alpha
    assert registry.get("beta").obj() == "beta"
    assert registry.names() == ["alpha", "beta"]
    assert "alpha" in registry and "gamma" not in registry
    node = ConfigStore.instance().load("toykind/alpha.yaml").node
    assert node.name == "alpha" and node.width == 3


def test_duplicate_name_raises_naming_the_first_owner():
    registry = Registry("dupkind")
    registry.register("same", ToyConfig, object)
    with pytest.raises(ConfigError, match=r"dupkind 'same' is already registered \(by builtins.object\)"):
        registry.register("same", ToyConfig, dict)


def test_unknown_name_lists_known_names_and_closest_match():
    registry = Registry("lookupkind")
    for name in ("fish", "sam", "erm"):
        registry.register(name, ToyConfig, object)
    with pytest.raises(ConfigError) as info:
        registry.get("fsh")
    message = str(info.value)
    assert "unknown lookupkind 'fsh'" in message
    assert "did you mean 'fish'?" in message
    assert "erm, fish, sam" in message


def test_config_must_be_a_dataclass():
    with pytest.raises(TypeError, match="must be a dataclass"):
        Registry("badkind").register("x", dict, object)
