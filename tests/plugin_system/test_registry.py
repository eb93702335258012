"""The registry: registration, duplicates, resolution and its error messages."""

from __future__ import annotations

import pytest
from twinkle.registry import (
    ComponentLoadError,
    ComponentNotFoundError,
    DuplicateComponentError,
    InvalidComponentError,
    Registry,
    UnknownKindError,
)


class MyLoss:
    pass


def test_register_and_resolve_lazy_target():
    registry = Registry()
    registry.register("optimizer", "Counter", "collections:Counter", plugin="p")
    import collections

    assert registry.resolve("optimizer", "Counter") is collections.Counter
    assert registry.get("optimizer", "Counter").plugin == "p"
    assert registry.names("optimizer") == ["Counter"]


def test_objects_pass_through_resolution():
    registry = Registry()
    assert registry.resolve("loss", MyLoss) is MyLoss


def test_duplicate_from_another_plugin_is_an_error_naming_both():
    registry = Registry()
    registry.register("optimizer", "Acc", "collections:Counter", plugin="first")
    with pytest.raises(DuplicateComponentError) as err:
        registry.register("optimizer", "Acc", "collections:OrderedDict", plugin="second")
    message = str(err.value)
    assert "first" in message and "second" in message and "override=True" in message


def test_override_replaces_and_is_recorded():
    from twinkle.registry import ComponentOverrideWarning

    registry = Registry()
    registry.register("optimizer", "Acc", "collections:Counter", plugin="first")
    with pytest.warns(ComponentOverrideWarning, match="plugin 'second' replaces optimizer 'Acc' of plugin 'first'"):
        entry = registry.register("optimizer", "Acc", "collections:OrderedDict", plugin="second", override=True)
    assert entry.overrides == "first"
    import collections

    assert registry.resolve("optimizer", "Acc") is collections.OrderedDict


def test_same_registration_twice_is_idempotent():
    registry = Registry()
    first = registry.register("optimizer", "Acc", "collections:Counter", plugin="p")
    assert registry.register("optimizer", "Acc", "collections:Counter", plugin="p") is first


def test_unknown_name_lists_registered_and_suggests_close_matches():
    registry = Registry()
    registry.register("optimizer", "AdamW", "collections:Counter", plugin="core")
    registry.register("optimizer", "SGD", "collections:Counter", plugin="core")
    with pytest.raises(ComponentNotFoundError) as err:
        registry.resolve("optimizer", "adamw")
    message = str(err.value)
    assert "Did you mean: 'AdamW'" in message
    assert "AdamW, SGD" in message
    assert isinstance(err.value, LookupError) and isinstance(err.value, ImportError)


def test_unknown_official_name_says_which_pip_install_brings_it():
    with pytest.raises(ComponentNotFoundError, match="pip install twinkle-megatron"):
        Registry().resolve("model", "MegatronModel")
    with pytest.raises(ComponentNotFoundError, match="pip install twinkle-ray"):
        Registry().resolve("launcher", "ray")


def test_unknown_kind():
    with pytest.raises(UnknownKindError, match="Did you mean 'loss'"):
        Registry().register("losses", "X", "a:b", plugin="p")


def test_bad_target_string():
    with pytest.raises(ValueError, match="package.module:attr"):
        Registry().register("loss", "X", "no_colon_here", plugin="p")


def test_target_that_fails_to_import_names_plugin_and_target():
    registry = Registry()
    registry.register("loss", "Ghost", "twinkle_no_such_module:Ghost", plugin="ghostly")
    with pytest.raises(ComponentLoadError, match="ghostly.*twinkle_no_such_module:Ghost"):
        registry.resolve("loss", "Ghost")


def test_component_must_subclass_its_kind_base():
    registry = Registry()
    registry.register("loss", "NotALoss", MyLoss, plugin="p")
    with pytest.raises(InvalidComponentError, match="does not subclass twinkle.loss.base.Loss"):
        registry.resolve("loss", "NotALoss")


def test_function_kinds_accept_functions_and_class_kinds_do_not():
    def reward_fn(trajectories):
        return [0.0 for _ in trajectories]

    registry = Registry()
    registry.register("reward", "fn", reward_fn, plugin="p")
    assert registry.resolve("reward", "fn") is reward_fn
    registry.register("template", "fn", reward_fn, plugin="p")
    with pytest.raises(InvalidComponentError, match="not a class"):
        registry.resolve("template", "fn")


def test_failed_plugins_are_mentioned_in_not_found_errors():
    registry = Registry()
    registry.failed_plugins["broken"] = "ImportError: boom"
    with pytest.raises(ComponentNotFoundError, match="broken: ImportError: boom"):
        registry.resolve("loss", "Anything")
