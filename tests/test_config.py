"""YAML composition and config errors: one line naming the file and the key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import attrs
import pytest

from packforcing.core.build import check_config
from packforcing.core.config import apply_override, deep_merge, load_config
from packforcing.core.errors import ConfigError, DeprecatedKeyWarning, ParamError
from packforcing.plugins import ComponentFactory, hookimpl
from packforcing.plugins.manager import Registry

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """Write YAML files under a temporary working directory: ``tree(name=text, ...)``."""
    monkeypatch.chdir(tmp_path)

    def write(**files: str) -> Path:
        for name, text in files.items():
            path = tmp_path / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return tmp_path

    return write


def error_of(source, overrides=(), *, build: bool = False, registry=None) -> str:
    with pytest.raises(ConfigError) as info:
        if build:
            check_config(load_config(source, overrides, registry=registry), registry=registry)
        else:
            load_config(source, overrides, registry=registry)
    message = str(info.value)
    assert "\n" not in message
    return message


BASE = textwrap.dedent(
    """
    model: {name: tiny_dit, hidden_size: 32, num_heads: 2, num_layers: 2, latent_height: 4, latent_width: 6}
    policy:
      name: sink_recent
      sink_frames: 8
      window_frames: 8
    backend: sdpa
    run: {device: cpu}
"""
)


# ---------------------------------------------------------------------- composition
def test_extends_a_list_merges_in_order_later_wins(tree):
    tree(
        base=BASE,
        steps="sampler: {steps: 2, shift: 3.0}\nrun: {seed: 5}",
        more="sampler: {steps: 3}",
        child="extends: [base.yaml, steps.yaml, more.yaml]\nrun: {blocks: 3}",
    )
    config = load_config("child.yaml")
    assert config.sampler.steps == 3 and config.sampler.shift == 3.0  # merged key by key
    assert (config.run.seed, config.run.blocks, config.run.device) == (5, 3, "cpu")
    assert config.components["policy"].params.window_frames == 8


def test_extends_is_relative_to_the_file_and_chains(tree):
    tree(**{"a/base": BASE, "a/b/mid": "extends: ../base.yaml\npolicy: {window_frames: 12}"})
    tree(top="extends: a/b/mid.yaml\npolicy: {sink_frames: 4}")
    params = load_config("top.yaml").components["policy"].params
    assert (params.sink_frames, params.window_frames) == (4, 12)


def test_a_block_naming_another_component_replaces_it(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {name: sliding_window, window_frames: 4}")
    config = load_config("child.yaml")
    # sink_frames of the sink_recent block is not merged into sliding_window (it would be unknown)
    assert config.resolved()["policy"] == {"name": "sliding_window", "window_frames": 4, "page_blocks": 4}


def test_naming_another_sampler_replaces_a_nameless_sampler_section(tree):
    """A sampler section without ``name`` is the default (euler): naming another sampler in an
    extending file replaces it, as ``--set sampler.name=...`` does; naming euler merges."""
    tree(base=BASE + "sampler: {steps: 8, shift: 3.0}\n", child="extends: base.yaml\nsampler: {name: self_forcing}")
    assert load_config("child.yaml").components["sampler"].name == "self_forcing"
    assert load_config("base.yaml", ["sampler.name=self_forcing"]).components["sampler"].name == "self_forcing"
    tree(same="extends: base.yaml\nsampler: {name: euler, steps: 2}")
    assert load_config("same.yaml").resolved()["sampler"] == {"name": "euler", "steps": 2, "shift": 3.0}


def test_a_section_spelled_as_a_name_merges_with_a_mapping_of_that_name(tree):
    """``policy: sink_recent`` is ``{name: sink_recent}``: a nameless section extending it adds
    parameters, and one naming another policy replaces it."""
    tree(base=BASE.replace("policy:\n  name: sink_recent\n  sink_frames: 8\n  window_frames: 8", "policy: sink_recent"))
    tree(child="extends: base.yaml\npolicy: {sink_frames: 2, window_frames: 4}")
    params = load_config("child.yaml").components["policy"].params
    assert (params.sink_frames, params.window_frames) == (2, 4)
    tree(other="extends: base.yaml\npolicy: {name: sliding_window, window_frames: 4}")
    assert load_config("other.yaml").components["policy"].name == "sliding_window"
    tree(full="extends: child.yaml\npolicy: sink_recent")  # the name alone keeps the parameters set before
    assert load_config("full.yaml").components["policy"].params.window_frames == 4


def test_same_name_merges_parameters(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {name: sink_recent, window_frames: 4}")
    params = load_config("child.yaml").components["policy"].params
    assert (params.sink_frames, params.window_frames) == (8, 4)


def test_deep_merge_rules():
    base = {"a": {"b": 1, "c": [1, 2]}, "p": {"name": "x", "k": 1}}
    out = deep_merge(base, {"a": {"c": [3]}, "p": {"name": "y", "j": 2}})
    assert out == {"a": {"b": 1, "c": [3]}, "p": {"name": "y", "j": 2}}  # lists replaced, renamed block replaced
    assert base["a"]["c"] == [1, 2]  # inputs untouched


def test_overrides_are_yaml_typed_and_applied_last(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {window_frames: 4}")
    config = load_config("child.yaml", ["policy.window_frames=16", "sampler.shift=2", "run.seed=3"])
    assert config.components["policy"].params.window_frames == 16  # beats both files
    assert config.sampler.shift == 2.0 and isinstance(config.sampler.shift, float)
    assert config.run.seed == 3


def test_override_renaming_a_component_drops_its_old_parameters(tree):
    tree(base=BASE)
    config = load_config("base.yaml", ["policy.name=sliding_window", "policy.window_frames=4"])
    assert config.resolved()["policy"] == {"name": "sliding_window", "window_frames": 4, "page_blocks": 4}


def test_override_indexes_lists():
    data = {"policy": {"name": "tiered", "tiers": [{"name": "a", "blocks": 1}, {"name": "b", "blocks": 2}]}}
    out = apply_override(data, "policy.tiers[1].blocks=8")
    assert out["policy"]["tiers"][1] == {"name": "b", "blocks": 8}
    assert apply_override(data, "policy.tiers.0.name=z")["policy"]["tiers"][0]["name"] == "z"
    assert data["policy"]["tiers"][1]["blocks"] == 2  # a copy


def test_override_values_are_yaml():
    out = apply_override({}, "compressor={name: pool, window: [1, 2, 2]}")
    assert out == {"compressor": {"name": "pool", "window": [1, 2, 2]}}
    assert apply_override({}, "run.seed=007")["run"]["seed"] == 7
    assert apply_override({}, "run.device=cuda:1")["run"]["device"] == "cuda:1"


# ---------------------------------------------------------------------- deprecated keys
OLD_KEYS = BASE.replace("backend: sdpa", "attention: sdpa") + "positional: {name: temporal_rope_shift, anchor: window}"


def test_deprecated_keys_are_read_as_the_kinds_names(tree):
    """``attention:`` and ``positional:`` still work, as ``backend:`` and ``realigner:``."""
    tree(old=OLD_KEYS)
    with pytest.warns(DeprecatedKeyWarning) as caught:
        config = load_config("old.yaml")
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "old.yaml: attention: deprecated key, read as backend (write backend instead)",
        "old.yaml: positional: deprecated key, read as realigner (write realigner instead)",
    ]
    assert config.components["backend"].name == "sdpa"
    assert (config.components["realigner"].name, config.components["realigner"].params.anchor) == (
        "temporal_rope_shift",
        "window",
    )
    assert "attention" not in config.resolved() and "positional" not in config.resolved()
    with pytest.warns(DeprecatedKeyWarning):
        mapping = load_config({"policy": "full", "attention": {"name": "sdpa"}, "positional": "identity"})
    assert (mapping.components["backend"].name, mapping.components["realigner"].name) == ("sdpa", "identity")


def test_deprecated_keys_in_set_overrides_and_extends(tree):
    """``--set attention.name=x`` sets the backend; a file in the new keys extends one in the old."""
    tree(old=OLD_KEYS, child="extends: old.yaml\nrealigner: {anchor: absolute}\nbackend: {name: auto}")
    with pytest.warns(DeprecatedKeyWarning) as caught:
        config = load_config("child.yaml", ["attention.name=sdpa", "positional.anchor=window"])
    expected = "--set: attention: deprecated key, read as backend (write backend instead)"
    assert expected in {str(w.message) for w in caught}
    assert config.components["backend"].name == "sdpa"
    assert config.components["realigner"].params.anchor == "window"
    with pytest.warns(DeprecatedKeyWarning):
        assert load_config("child.yaml").components["realigner"].params.anchor == "absolute"
    with pytest.warns(DeprecatedKeyWarning):
        message = error_of("child.yaml", ["attention.name=nope"])
    assert message.startswith("--set: backend.name: unknown backend 'nope'"), message


def test_old_and_new_key_together_is_an_error(tree):
    tree(both=BASE + "attention: auto\n")
    expected = "both.yaml: attention: both attention (deprecated) and backend are given; keep only backend"
    assert error_of("both.yaml") == expected
    message = error_of({"policy": "full", "positional": "identity", "realigner": "identity"})
    assert message == "positional: both positional (deprecated) and realigner are given; keep only realigner"


def test_mapping_configs_and_defaults():
    config = load_config({"policy": "full", "run": {"device": "cpu"}})
    assert config.components["model"].name == "tiny_dit"
    assert config.components["backend"].name == "auto"
    assert config.components["compressor"] is None
    assert config.source is None


@pytest.mark.parametrize("path", sorted(p.relative_to(CONFIGS.parent) for p in CONFIGS.rglob("*.yaml")), ids=str)
def test_shipped_presets_load(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    config = load_config(path)
    assert config.source == str(path)
    assert config.components["policy"] is not None


# ---------------------------------------------------------------------- errors, one case each
def test_bad_yaml_syntax_names_file_and_line(tree):
    tree(bad="policy:\n  name: full\n  window: [1, 2\nrun: {}\n")
    message = error_of("bad.yaml")
    assert message.startswith("bad.yaml:") and "invalid YAML" in message
    line = int(message.split(":")[1])
    assert line in (3, 4)


def test_duplicate_keys_are_refused_with_their_line(tree):
    tree(dup="policy: {name: full}\nrun: {seed: 1}\npolicy: {name: sliding_window}\n")
    message = error_of("dup.yaml")
    assert message.startswith("dup.yaml:3: invalid YAML: duplicate key 'policy'")


def test_unknown_plugin_lists_the_available_names(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {name: sliding_windw}")
    message = error_of("child.yaml")
    assert message.startswith("child.yaml: policy.name: unknown policy 'sliding_windw'")
    assert "did you mean 'sliding_window'" in message
    assert "available:" in message and "full" in message and "sink_recent" in message


def test_wrong_type(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {window_frames: eight}")
    assert error_of("child.yaml") == "child.yaml: policy.window_frames: expected an integer, got 'eight'"


def test_wrong_type_bool_is_not_an_integer(tree):
    tree(base=BASE, child="extends: base.yaml\nrun: {seed: true}")
    assert error_of("child.yaml") == "child.yaml: run.seed: expected an integer, got true"


@pytest.mark.parametrize("key", ["run.seed", "model.seed"])
def test_seed_is_bounded_to_what_torch_generators_take(tree, key):
    tree(base=BASE)
    assert load_config("base.yaml", [f"{key}={2**63 - 1}"]).resolved()[key.split(".")[0]]["seed"] == 2**63 - 1
    assert error_of("base.yaml", [f"{key}=100000000000000000000"]) == (
        f"--set: {key}: expected an integer >= 0 and < 2**63 (a torch generator seed), got 100000000000000000000"
    )


@pytest.mark.parametrize("key", ["run.device", "text_encoder.device"])
def test_device_names_torch_does_not_know_are_config_errors(tree, key):
    tree(base=BASE)
    assert error_of("base.yaml", [f"{key}=banana"]) == (
        f"--set: {key}: expected auto or a torch device (cpu, cuda, cuda:N, mps, ...), got 'banana'"
    )
    for name in ("auto", "cpu", "cuda", "cuda:1", "meta"):  # a config can be checked on another machine
        load_config("base.yaml", [f"{key}={name}"])


def test_out_of_range_value_matches_the_issue_example(tree):
    tree(**{"configs/x": BASE.replace("sink_frames: 8", "sink_frames: -3")})
    assert error_of("configs/x.yaml") == "configs/x.yaml: policy.sink_frames: expected an integer >= 0, got -3"


def test_out_of_range_in_a_parent_names_the_parent(tree):
    tree(base=BASE.replace("window_frames: 8", "window_frames: 0"), child="extends: base.yaml\nrun: {seed: 2}")
    assert error_of("child.yaml") == "base.yaml: policy.window_frames: expected an integer >= 1, got 0"


def test_non_finite_number_is_refused(tree):
    tree(base=BASE)
    assert error_of("base.yaml", ["sampler.shift=.nan"]) == "--set: sampler.shift: expected a finite number, got .nan"


def test_unknown_key_with_did_you_mean(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {sink_frame: 4}")
    message = error_of("child.yaml")
    assert message.startswith("child.yaml: policy.sink_frame: unknown key; did you mean 'sink_frames'?")


def test_unknown_top_level_key(tree):
    tree(bad=BASE + "\nsampling: {steps: 2}\n")
    message = error_of("bad.yaml")
    assert message.startswith("bad.yaml: sampling: unknown top-level key; did you mean 'sampler'?")


def test_unknown_nested_key_in_a_tier(tree):
    tree(
        bad="""
        policy:
          name: tiered
          tiers:
            - {name: sink, frames: 4, pinned: true}
            - {name: recent, frams: 8}
        """
    )
    message = error_of("bad.yaml")
    assert message.startswith("bad.yaml: policy.tiers[1].frams: unknown key; did you mean 'frames'?")


def test_missing_required_parameter(tree):
    tree(bad="policy: {name: sliding_window}")
    assert error_of("bad.yaml") == "bad.yaml: policy.window_frames: required key is missing"


def test_missing_component_name(tree):
    tree(bad="policy: {window_frames: 8}")
    message = error_of("bad.yaml")
    assert message.startswith("bad.yaml: policy.name: required key is missing (available:")


def test_missing_policy_section(tree):
    tree(bad="run: {seed: 1}")
    message = error_of("bad.yaml")
    assert message.startswith("bad.yaml: policy: required section is missing")


def test_missing_file(tree):
    tree(full="policy: full")
    assert error_of("ful.yaml") == "ful.yaml: file not found (did you mean 'full.yaml'?)"
    assert error_of("nothing/here.yaml") == "nothing/here.yaml: file not found"


def test_missing_extends_file(tree):
    tree(child="extends: nope.yaml\npolicy: full")
    assert (
        error_of("child.yaml")
        == "child.yaml: extends: nope.yaml: file not found (nor a preset: see 'packforcing presets')"
    )
    tree(typo="extends: sink_recnt\npolicy: full")  # extends may name a preset: a near miss is one
    assert (
        error_of("typo.yaml")
        == "typo.yaml: extends: sink_recnt: file not found (did you mean the preset 'sink_recent'?)"
    )
    tree(sub="extends: sub/none.yaml\npolicy: full")
    assert (
        error_of("sub.yaml")
        == "sub.yaml: extends: sub/none.yaml: file not found (nor a preset: see 'packforcing presets')"
    )


def test_missing_file_in_an_extends_list(tree):
    tree(base=BASE, child="extends: [base.yaml, nope.yaml]\n")
    assert (
        error_of("child.yaml")
        == "child.yaml: extends[1]: nope.yaml: file not found (nor a preset: see 'packforcing presets')"
    )


def test_cyclic_extends(tree):
    tree(a="extends: b.yaml\npolicy: full", b="extends: c.yaml", c="extends: a.yaml")
    message = error_of("a.yaml")
    assert message == "c.yaml: extends: cyclic extends: a.yaml -> b.yaml -> c.yaml -> a.yaml"


def test_self_extends_is_a_cycle(tree):
    tree(a="extends: a.yaml\npolicy: full")
    assert error_of("a.yaml") == "a.yaml: extends: cyclic extends: a.yaml -> a.yaml"


def test_extends_of_the_wrong_type(tree):
    tree(a="extends: {path: b.yaml}\npolicy: full")
    assert error_of("a.yaml") == "a.yaml: extends: expected a path or a list of paths, got {path: 'b.yaml'}"


def test_top_level_must_be_a_mapping(tree):
    tree(a="- policy\n- run\n")
    assert error_of("a.yaml") == "a.yaml: expected a mapping at the top level, got list"


def test_bad_override_syntax():
    assert error_of({"policy": "full"}, ["policy.name"]).startswith("--set: expected KEY.PATH=VALUE")
    assert error_of({"policy": {"name": "tiered", "tiers": []}}, ["policy.tiers[2].blocks=1"]) == (
        "--set: policy.tiers[2].blocks: index 2 is out of range (0 items)"
    )


def test_override_through_a_scalar_is_refused():
    assert error_of({"policy": "full", "run": {"seed": 0}}, ["run.seed.x=1"]) == (
        "--set: run.seed.x: cannot set it: run.seed is 0, not a mapping"
    )


def test_override_errors_name_set(tree):
    tree(base=BASE)
    assert error_of("base.yaml", ["policy.sink_frames=-3"]) == (
        "--set: policy.sink_frames: expected an integer >= 0, got -3"
    )


def test_mapping_errors_name_the_key_path_only():
    assert error_of({"policy": {"name": "sliding_window", "window_frames": -1}}) == (
        "policy.window_frames: expected an integer >= 1, got -1"
    )


# ---------------------------------------------------------------------- errors found while building
def test_window_smaller_than_a_block_is_located(tree):
    tree(base=BASE, child="extends: base.yaml\npolicy: {name: sliding_window, window_frames: 2}")
    message = error_of("child.yaml", build=True)
    assert message == "child.yaml: policy.window_frames: 2 frames is smaller than one block (4 frames)"


def test_tier_smaller_than_a_block_is_located(tree):
    tree(
        base=BASE,
        child="""
        extends: base.yaml
        policy:
          name: tiered
          tiers:
            - {name: recent, frames: 3}
        """,
    )
    message = error_of("child.yaml", build=True)
    assert message == "child.yaml: policy.tiers.recent.frames: 3 frames is smaller than one block (4 frames)"


def test_compressed_tier_without_a_compressor(tree):
    tree(
        base=BASE,
        child="""
        extends: base.yaml
        policy:
          name: tiered
          tiers:
            - {name: mid, blocks: 2, fidelity: compressed}
            - {name: recent, frames: 4}
        """,
    )
    message = error_of("child.yaml", build=True)
    assert message.startswith("child.yaml: policy.tiers[0].fidelity: ")
    assert "no top-level compressor" in message


def test_model_inconsistency_is_located(tree):
    tree(base=BASE, child="extends: base.yaml\nmodel: {hidden_size: 30, num_heads: 4}")
    message = error_of("child.yaml")
    assert message == "child.yaml: model: hidden_size=30 is not divisible by num_heads=4"


# ---------------------------------------------------------------------- cross-component consistency
@attrs.frozen
class PickParams:
    k: int = 4


class PickSelector:
    """A selector plugin that checks its ``k`` against the capacity of the tiers it selects from."""

    name = "pick"
    shared_across_layers = False

    def __init__(self, params: PickParams) -> None:
        self.params = params

    def budget(self, n: int) -> int:
        return min(self.params.k, n)

    def validate(self, env) -> None:
        for spec, slot in zip(env.policy.params.tiers, env.policy.layout.specs, strict=True):
            if spec.select and slot.capacity is not None and self.params.k > slot.capacity:
                raise ParamError(
                    "k", f"{self.params.k} is larger than the {spec.name} tier's capacity ({slot.capacity})"
                )


class _PickPlugin:
    @staticmethod
    @hookimpl
    def packforcing_selectors():
        return {"pick": ComponentFactory(PickParams, lambda p, env: PickSelector(p))}


def test_components_validate_hook_reports_inconsistent_values(tree):
    registry = Registry.create(entry_points=False, extra_plugins=[(_PickPlugin, "pick-plugin")])
    tree(
        base=BASE,
        ok="""
        extends: base.yaml
        policy:
          name: tiered
          tiers:
            - {name: mid, blocks: 4, select: true}
            - {name: recent, frames: 4}
        selector: {name: pick, k: 4}
        """,
        bad="extends: ok.yaml\nselector: {k: 6}",
    )
    assert check_config("ok.yaml", registry=registry).components["selector"].params.k == 4
    message = error_of("bad.yaml", build=True, registry=registry)
    assert message == "bad.yaml: selector.k: 6 is larger than the mid tier's capacity (4)"


def test_packforcing_k_larger_than_mid_capacity(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    message = error_of(
        "configs/packforcing.yaml",
        ["selector.k=9", "compressor={name: pool, window: [1, 2, 2]}"],
        build=True,
    )
    assert message.startswith("--set: selector.k: ")
    assert "9" in message and "mid" in message


# ---------------------------------------------------------------------- structured parameter errors
def test_parameter_errors_carry_their_key_path():
    """A ParamError's path is placed under the component's key (or kept when absolute); a plain
    ValueError is reported at the component, whatever its text looks like (no message parsing)."""
    import attrs

    from packforcing.api import Compressor

    @attrs.frozen
    class Picky(Compressor):
        mode: str = "ok"

        @classmethod
        def from_env(cls, params, env):
            if params.mode == "relative":
                raise ParamError("mode", "refused here")
            if params.mode == "absolute":
                raise ParamError("run.seed", "refused over there")
            if params.mode == "plain":
                raise ValueError("mode: only looks like a key path")
            return params

        def output_grid(self, grid):
            return grid

        def compress(self, block, model):
            raise NotImplementedError

    class Plugin:
        @staticmethod
        @hookimpl
        def packforcing_compressors():
            return {"picky": Picky}

    registry = Registry.create(entry_points=False, extra_plugins=[(Plugin, "picky-dist")])
    expected = {
        "relative": "compressor.mode: refused here",
        "absolute": "run.seed: refused over there",
        "plain": "compressor: mode: only looks like a key path",
    }
    for mode, message in expected.items():
        config = {"policy": "full", "compressor": {"name": "picky", "mode": mode}, "run": {"device": "cpu"}}
        with pytest.raises(ConfigError) as info:
            check_config(config, registry=registry)
        assert str(info.value) == message
    with pytest.raises(ConfigError) as info:
        load_config({"policy": {"name": "full", "page_blocks": 0}})
    assert (info.value.path, info.value.message) == ("policy.page_blocks", "expected an integer >= 1, got 0")


# ---------------------------------------------------------------------- structuring (cattrs)
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compressor={name: pool, window: [1, 2]}", "compressor.window: expected a list of 3 items, got [1, 2]"),
        ("compressor={name: pool, window: abc}", "compressor.window: expected a list, got 'abc'"),
        ("compressor={name: pool, window: [1, x, 2]}", "compressor.window[1]: expected an integer, got 'x'"),
        (
            "compressor={name: pool, window: [1, 0, 2]}",
            "compressor.window: expected three integers >= 1, got (1, 0, 2)",
        ),
        ("run.checkpoint_every=x", "run.checkpoint_every: expected an integer or null, got 'x'"),
        ("run.threads=[2]", "run.threads: expected an integer or a string, got [2]"),
        ("policy.tiers[1].blocks=-1", "policy.tiers[1].blocks: expected an integer >= 0, got -1"),
        ("policy.tiers[1]={name: x, blocks: 1, frams: 2, blcks: 3}", "policy.tiers[1].frams: unknown key"),
        ("policy.tiers[1]=[3]", "policy.tiers[1]: expected a mapping, got [3]"),
        ("policy.tiers=7", "policy.tiers: expected a list, got 7"),
        ("backend.split_context=true", "backend.split_context: unknown key (backend 'auto' takes no parameters)"),
        ("realigner={name: identity, anchor: absolute}", "realigner.anchor: unknown key (realigner 'identity' takes"),
    ],
)
def test_structuring_errors_name_the_first_problem_and_its_key_path(override, message):
    """Lists, fixed-length lists, unions and nested classes through cattrs: one line, the first
    problem as written, its full key path."""
    text = error_of("packforcing_tiered", [override])
    assert text.startswith(f"--set: {message}"), text


def test_structuring_takes_parameter_objects_and_unresolvable_annotations_as_they_are():
    """A params instance is used as is; a field annotated with a name that cannot be resolved
    (imported only for type checking) takes its value unchanged, the other fields are checked."""
    from packforcing.core.structure import structure
    from packforcing.policies.tier_specs import TierSpec

    spec = TierSpec(name="a", blocks=2)
    assert structure(TierSpec, spec, "x") is spec
    namespace: dict = {}
    exec(
        "from __future__ import annotations\nimport attrs, typing\n"
        "if typing.TYPE_CHECKING:\n    from nowhere import Thing\n"
        "@attrs.frozen\nclass P:\n    thing: Thing = None\n"
        "    things: list[Thing] = attrs.Factory(list)\n    n: int = 1\n",
        namespace,
    )
    params = structure(namespace["P"], {"thing": object, "things": [1, "a"], "n": 2.0}, "compressor")
    assert (params.thing, params.things, params.n) == (object, [1, "a"], 2)
    with pytest.raises(ConfigError, match=r"^compressor\.n: expected an integer, got 'x'$"):
        structure(namespace["P"], {"n": "x"}, "compressor")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("selector.heads=[]", "selector.heads: expected a non-empty list of head indices >= 0, got ()"),
        ("selector.heads=[0, -1]", "selector.heads: expected a non-empty list of head indices >= 0, got (0, -1)"),
        ("compressor.hr_channels=[4, 8]", "compressor.hr_channels: expected 4 integers >= 1, got [4, 8]"),
        ("compressor.hr_channels=[4, 8, 0, 8]", "compressor.hr_channels: expected 4 integers >= 1, got [4, 8, 0, 8]"),
        ("model={name: wan, dtype: float8}", "model.dtype: expected one of "),
    ],
)
def test_component_validators_composed_from_attrs_validators(override, message):
    assert error_of("packforcing", [override]).startswith(f"--set: {message}")


def test_explained_attrs_validators_name_the_field():
    """``explained`` turns an attrs validator's failure into the field's one-line ParamError; a
    bare attrs validator's error is still one line, at the component."""
    from packforcing.api import explained
    from packforcing.core.structure import structure

    @attrs.frozen
    class Params:
        k: int = attrs.field(default=1, validator=explained("an integer >= 1", attrs.validators.ge(1)))
        raw: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    with pytest.raises(ParamError) as info:
        Params(k=0)
    assert (info.value.path, info.value.message) == ("k", "expected an integer >= 1, got 0")
    with pytest.raises(ConfigError, match=r"^compressor\.k: expected an integer >= 1, got 0$"):
        structure(Params, {"k": 0}, "compressor")
    with pytest.raises(ConfigError, match=r"^compressor: 'raw' must be >= 1: 0$"):
        structure(Params, {"raw": 0}, "compressor")
