"""Third-party plugins: entry points, error isolation, duplicates, and the plugin template."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import attrs
import pytest

import packforcing as pf
from packforcing.attention.backends import SdpaBackend
from packforcing.cli import main
from packforcing.compressors.pool import PoolCompressor, PoolParams
from packforcing.core.build import check_config
from packforcing.core.interfaces import Compressor
from packforcing.core.records import CompressedKV
from packforcing.plugins import ComponentFactory, hookimpl, no_params
from packforcing.plugins.manager import DISABLE_ENV, PluginWarning, Registry, UnknownComponentError, entry_points_in
from packforcing.positional.identity import IdentityRealigner
from packforcing.selectors.recency import RecencySelector
from packforcing.testing import check_compressor, check_policy

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "plugin-template"


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module implementing ``hooks`` (``packforcing_<kind>=function``)."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module


def realigners(*names: str):
    return lambda: {n: no_params(lambda env: IdentityRealigner(), f"from a plugin ({n})") for n in names}


def create(*plugins: tuple[types.ModuleType, str], **kwargs) -> tuple[Registry, list[str]]:
    """A registry with ``plugins`` and the warnings its creation and first lookup raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry.create(entry_points=kwargs.pop("entry_points", False), extra_plugins=plugins, **kwargs)
        registry.providers()
    return registry, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


# ---------------------------------------------------------------------- built-ins are plugins too
def test_builtins_register_through_the_hooks():
    registry, problems = create()
    assert problems == []
    kinds = {p.kind for p in registry.providers()}
    assert kinds == {"model", "backend", "realigner", "selector", "compressor", "policy", "sampler"}
    assert {p.dist for p in registry.providers()} == {"packforcing"}
    assert {"full", "sliding_window", "sink_recent", "tiered"} <= set(registry.names("policy"))


def test_a_plugin_adds_components():
    registry, problems = create((plugin("extra", packforcing_realigners=realigners("still")), "extra-dist"))
    assert problems == []
    provided = registry.get("realigner", "still")
    assert provided.dist == "extra-dist"
    config = pf.load_config({"policy": "full", "realigner": "still", "run": {"device": "cpu"}}, registry=registry)
    assert config.components["realigner"].name == "still"


# ---------------------------------------------------------------------- registering a class
class MyPool(PoolCompressor):
    """Average pooling, registered under a name of my own."""


@attrs.frozen
class Halves(Compressor):
    """Keep the first ``keep`` temporal tokens (an attrs class that is its own parameters)."""

    keep: int = 1
    model_width: int = 0  # set from the environment by from_env

    @classmethod
    def from_env(cls, params: Halves, env) -> Halves:
        return attrs.evolve(params, model_width=env.model.hidden_size)

    def output_grid(self, grid):
        return (min(self.keep, grid[0]), grid[1], grid[2])

    def compress(self, block, model):
        t, h, w = self.output_grid(block.grid)
        first = lambda x: x[:, : t * h * w].clone()  # noqa: E731
        return CompressedKV(
            grid=(t, h, w),
            temporal_stride=block.temporal_stride,
            position=block.position,
            keys=[first(k) for k in block.keys],
            values=[first(v) for v in block.values],
            hw_stride=block.hw_stride,
        )


@attrs.frozen
class StillParams:
    shift: float = 0.0


class Still(IdentityRealigner):
    """A realigner whose parameters come from a ``Params`` attribute."""

    Params = StillParams

    def __init__(self, params: StillParams) -> None:
        self.params = params


def classes() -> types.ModuleType:
    return plugin(
        "classes",
        packforcing_compressors=lambda: {"my_pool": MyPool, "halves": Halves},
        packforcing_realigners=lambda: {"still": Still},
    )


def test_a_hook_may_return_component_classes():
    registry, problems = create((classes(), "class-dist"))
    assert problems == []
    pool = registry.get("compressor", "my_pool").factory
    assert pool.params is PoolParams and pool.component is MyPool  # from __init__'s annotation
    assert pool.description == "Average pooling, registered under a name of my own."
    halves = registry.get("compressor", "halves").factory
    assert halves.params is Halves
    assert registry.get("realigner", "still").factory.params is StillParams
    rows = {(p.kind, p.name): p.factory.description for p in registry.providers()}
    assert rows[("realigner", "still")] == "A realigner whose parameters come from a Params attribute."


def test_the_registry_names_a_registered_class_everywhere(tmp_path):
    """A subclass of PoolCompressor registered as my_pool is my_pool, also in stored block records."""
    registry, _ = create((classes(), "class-dist"))
    config = pf.load_config(
        {
            "model": {"name": "tiny_dit", "latent_height": 4, "latent_width": 4},
            "policy": {"name": "packforcing", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 2},
            "compressor": {"name": "my_pool", "window": [2, 2, 2]},
            "selector": {"name": "recency", "k": 1},
            "realigner": {"name": "still", "shift": 0.5},
            "sampler": {"steps": 1},
            "run": {"device": "cpu"},
        },
        registry=registry,
    )
    assert config.components["realigner"].params == StillParams(shift=0.5)
    engine = pf.build_engine(config, registry=registry)
    assert isinstance(engine.policy.realigner, Still) and engine.policy.realigner.name == "still"
    list(engine.generate(5, seed=0))
    mid = engine.policy.tier_blocks("mid")
    assert mid and {b.fidelity for b in mid} == {"my_pool"}
    assert engine.policy.tier_compressor("mid").name == "my_pool"
    assert PoolCompressor.name == "pool" and MyPool.name == "pool"  # classes are left alone


def test_an_attrs_class_is_built_through_from_env():
    registry, _ = create((classes(), "class-dist"))
    config = pf.load_config(
        {"policy": "full", "compressor": {"name": "halves", "keep": 2}, "run": {"device": "cpu"}}, registry=registry
    )
    engine = pf.build_engine(config, registry=registry)
    assert config.components["compressor"].params == Halves(keep=2)
    built = next(c for path, c, _ in _built(config, registry) if path == "compressor")
    assert built == Halves(keep=2, model_width=engine.model.hidden_size) and built.name == "halves"
    check_compressor(registry.factory("compressor", "halves"), {"keep": 2}, max_examples=3)


def _built(config, registry):
    from packforcing.core.build import build_for_planning

    return build_for_planning(config, registry=registry).built


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        (lambda: {"x": IdentityRealigner}, "returned class IdentityRealigner for 'x', expected a ComponentFactory or "
         "a subclass of Compressor"),
        (lambda: {"x": type("Loose", (PoolCompressor,), {"__init__": lambda self, params: None})},
         "returned class Loose for 'x': Loose.__init__(params) must be annotated with an attrs class"),
    ],
    ids=["wrong-base", "unannotated-params"],
)  # fmt: skip
def test_a_class_that_cannot_be_registered_is_reported(hook, expected):
    registry, problems = create((plugin("bad", packforcing_compressors=hook), "bad-dist"))
    assert len(problems) == 1 and "bad-dist" in problems[0] and expected in problems[0], problems
    assert "x" not in registry.names("compressor")


def test_a_hook_function_without_hookimpl_is_reported_like_a_typo():
    module = types.ModuleType("forgot")
    module.packforcing_compressors = lambda: {"my_pool": MyPool}  # no @hookimpl
    module.packforcing_selectr = lambda: {}  # misspelled and unmarked
    registry, problems = create((module, "forgot-dist"))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "forgot-dist" in problems[0]
    assert "hook 'packforcing_compressors' is not marked @hookimpl" in problems[0]
    assert "'packforcing_selectr' (did you mean 'packforcing_selectors'?) is not marked @hookimpl" in problems[0]
    assert "my_pool" not in registry.names("compressor")


# ---------------------------------------------------------------------- broken plugins are isolated
@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        (lambda: None, "returned NoneType, expected a mapping"),
        (lambda: ["identity"], "returned list, expected a mapping"),
        (lambda: {"x": object()}, "returned object for 'x', expected a ComponentFactory"),
        (lambda: {"a:b": no_params(lambda env: None)}, "invalid component name 'a:b'"),
        (lambda: 1 / 0, "ZeroDivisionError: division by zero"),
    ],
    ids=["none", "list", "not-a-factory", "colon-name", "raises"],
)
def test_a_hook_returning_the_wrong_thing_is_reported_once_and_skipped(hook, expected):
    good = plugin("good", packforcing_realigners=realigners("fine"))
    bad = plugin("bad", packforcing_realigners=hook, packforcing_selectors=realigners("unused"))
    registry, problems = create((bad, "bad-dist"), (good, "good-dist"))
    assert len(problems) == 1
    assert "bad-dist" in problems[0] and "packforcing_realigners" in problems[0] and expected in problems[0]
    assert "\n" not in problems[0]
    assert "fine" in registry.names("realigner") and "identity" in registry.names("realigner")
    assert "unused" in registry.names("selector")  # the plugin's other, working hook still counts
    # the broken hook's components are skipped; asking again does not warn again
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        registry.names("realigner")
        registry.get("policy", "full")
    assert again == []
    assert registry.problems == problems


def test_a_factory_with_a_non_attrs_params_class_is_reported():
    bad = plugin("bad", packforcing_compressors=lambda: {"x": ComponentFactory(dict, lambda p, env: None)})
    registry, problems = create((bad, "bad-dist"))
    assert len(problems) == 1 and "bad-dist" in problems[0] and "attrs class" in problems[0]
    assert "x" not in registry.names("compressor")


def test_an_unknown_hook_name_is_reported_with_a_suggestion():
    typo = plugin("typo", packforcing_compresors=lambda: {})
    registry, problems = create((typo, "typo-dist"))
    assert len(problems) == 1
    assert "typo-dist" in problems[0] and "did you mean 'packforcing_compressors'" in problems[0]
    assert registry.names("policy")  # everything else works


def test_a_hook_with_arguments_the_spec_lacks_is_reported():
    bad = plugin("bad", packforcing_policies=lambda registry: {})
    registry, problems = create((bad, "bad-dist"))
    assert len(problems) == 1 and "bad-dist" in problems[0] and "could not be registered" in problems[0]
    assert "full" in registry.names("policy")


# ---------------------------------------------------------------------- duplicates
def duplicates():
    return (
        (plugin("one", packforcing_realigners=realigners("twin")), "dist-one"),
        (plugin("two", packforcing_realigners=realigners("twin")), "dist-two"),
    )


def test_two_plugins_with_one_name_is_a_clear_error_naming_both():
    registry, _ = create(*duplicates())
    with pytest.raises(UnknownComponentError) as info:
        registry.get("realigner", "twin")
    message = str(info.value)
    assert "dist-one" in message and "dist-two" in message and "'<distribution>:twin'" in message


def test_dist_qualified_name_picks_one(tmp_path):
    registry, _ = create(*duplicates())
    assert registry.get("realigner", "dist-two:twin").dist == "dist-two"
    assert registry.get("realigner", "DIST_ONE:twin").dist == "dist-one"  # normalised like pip
    with pytest.raises(UnknownComponentError, match="not provided by distribution packforcing"):
        registry.get("realigner", "packforcing:twin")
    # from YAML
    path = tmp_path / "twin.yaml"
    path.write_text("policy: full\nrealigner: {name: 'dist-one:twin'}\nrun: {device: cpu}\n")
    config = pf.load_config(path, registry=registry)
    assert config.components["realigner"].name == "dist-one:twin"
    engine = pf.build_engine(config, registry=registry)
    assert engine.policy.realigner.name == "twin"  # named by the registry, not by its class


def test_duplicate_in_yaml_is_one_config_error_line(tmp_path):
    registry, _ = create(*duplicates())
    path = tmp_path / "twin.yaml"
    path.write_text("policy: full\nrealigner: twin\n")
    with pytest.raises(pf.ConfigError) as info:
        pf.load_config(path, registry=registry)
    message = str(info.value)
    assert message.startswith(f"{path}: realigner.name: realigner 'twin' is provided by dist-one and dist-two")


def test_disabled_distributions_are_skipped(monkeypatch):
    registry, _ = create(*duplicates(), disabled=["dist-one"])
    assert registry.get("realigner", "twin").dist == "dist-two"
    monkeypatch.setenv(DISABLE_ENV, "dist-two, other")
    registry, _ = create(*duplicates())
    assert registry.get("realigner", "twin").dist == "dist-one"


# ---------------------------------------------------------------------- real entry points
@pytest.fixture
def fake_distributions(tmp_path, monkeypatch):
    """``add(dist, module_source or None, entry_points)``: an installed distribution on sys.path.

    Registries in these tests read the entry points of ``add.site`` only, so other packforcing
    plugins installed in the environment do not change what they see."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []

    def add(dist: str, module: str, source: str | None, entry: str | None = None) -> None:
        info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[packforcing]\n{entry or module} = {module}\n")
        if source is not None:
            (site / f"{module}.py").write_text(source)
        added.append(module)
        importlib.invalidate_caches()

    add.site = site  # type: ignore[attr-defined]
    yield add
    for module in added:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


GOOD_SOURCE = """
from packforcing.plugins import hookimpl, no_params
from packforcing.positional.identity import IdentityRealigner

@hookimpl
def packforcing_realigners():
    return {"from_entry_point": no_params(lambda env: IdentityRealigner(), "an entry-point realigner")}
"""


def test_entry_points_are_loaded_and_import_failures_isolated(fake_distributions):
    fake_distributions("pf-good", "pf_good_plugin", GOOD_SOURCE)
    fake_distributions("pf-missing", "pf_missing_module", None)
    fake_distributions("pf-crash", "pf_crash_plugin", "raise RuntimeError('boom at import')\n")
    registry, problems = create(entry_points=entry_points_in(fake_distributions.site))
    provided = registry.get("realigner", "from_entry_point")
    assert (provided.dist, provided.version) == ("pf-good", "1.2.3")
    assert len(problems) == 2
    missing = next(p for p in problems if "pf-missing" in p)
    assert "failed to load" in missing and "ModuleNotFoundError" in missing
    crash = next(p for p in problems if "pf-crash" in p)
    assert "RuntimeError: boom at import" in crash
    assert "full" in registry.names("policy")
    assert registry.distributions()["pf-good"] == "1.2.3"


def test_disable_env_var_skips_entry_point_distributions(fake_distributions, monkeypatch):
    fake_distributions("pf-good", "pf_good_plugin", GOOD_SOURCE)
    monkeypatch.setenv(DISABLE_ENV, "pf_good")
    registry, problems = create(entry_points=entry_points_in(fake_distributions.site))
    assert "from_entry_point" not in registry.names("realigner") and problems == []


def test_cli_reports_a_broken_plugin_once_on_one_line(fake_distributions, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    fake_distributions("pf-crash", "pf_crash_plugin", "raise RuntimeError('boom at import')\n")
    import packforcing.plugins.manager as manager

    fresh = manager.default_registry.__wrapped__  # a new process-wide registry for this test
    monkeypatch.setattr(manager, "default_registry", functools.cache(fresh))
    code = main(["validate", "configs/full.yaml", "configs/sink_recent.yaml"])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if "pf-crash" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: plugin") and "boom at import" in lines[0]


# ---------------------------------------------------------------------- the plugin template
def can_build_offline() -> bool:
    """This environment's setuptools can build a wheel by itself (>= 70.1, or with ``wheel``)."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed_template(tmp_path_factory):
    """examples/plugin-template installed with pip into a fresh directory put on sys.path (and
    PYTHONPATH for subprocesses), as a separate distribution; removed after this module."""
    work = tmp_path_factory.mktemp("template")
    source = work / "src"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(source)]
    if can_build_offline():
        command[4:4] = ["--no-build-isolation", "--no-index"]  # build with this venv's setuptools
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    def template_modules() -> dict[str, types.ModuleType]:
        return {
            m: mod
            for m, mod in sys.modules.items()
            if m == "packforcing_strided" or m.startswith("packforcing_strided.")
        }

    # the same template installed in this environment (pip install -e examples/plugin-template)
    # may be imported already, by the default registry: set aside, so this copy is the one used
    installed = template_modules()
    for name in installed:
        del sys.modules[name]
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    for name in template_modules():
        del sys.modules[name]
    sys.modules.update(installed)
    importlib.invalidate_caches()


def subprocess_env(site: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env.pop(DISABLE_ENV, None)
    return env


def test_template_is_a_separate_distribution_found_by_entry_point(installed_template):
    registry, problems = create(entry_points=entry_points_in(installed_template))
    assert problems == []
    provided = registry.get("compressor", "strided")
    assert (provided.dist, provided.version) == ("packforcing-strided", "0.1.0")
    assert provided.factory.component.__name__ == "StridedCompressor"  # a class, its own parameters
    assert provided.factory.params is provided.factory.component
    assert Path(sys.modules["packforcing_strided"].__file__).is_relative_to(installed_template)


def test_template_passes_the_test_kit(installed_template):
    registry = Registry.create(entry_points=entry_points_in(installed_template))
    factory = registry.factory("compressor", "strided")
    check_compressor(factory)
    check_compressor(factory, {"stride": [2, 2, 2]})
    tiered = {"tiers": [{"name": "mid", "blocks": 2, "fidelity": "compressed"}, {"name": "recent", "blocks": 1}]}
    check_policy(registry.factory("policy", "tiered"), tiered, compressor=factory)


def test_generate_selects_the_template_from_yaml(installed_template, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "strided.yaml"
    config.write_text(
        f"extends: {TEMPLATE / 'configs' / 'strided.yaml'}\n"
        "compressor: {name: 'packforcing-strided:strided', stride: [1, 2, 2]}\n"
    )
    command = [sys.executable, "-m", "packforcing", "generate", "--config", str(config), "--blocks", "12"]
    command += ["--out", str(out), "--no-progress", "--set", "model.latent_height=4", "--set", "model.latent_width=4"]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(installed_template), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["compressor"] == {"name": "packforcing-strided:strided", "stride": [1, 2, 2]}
    last = report["blocks"][-1]["tiers"]
    # 4x4 latent -> 2x2 tokens per frame, 16 per 4-frame block; strided [1, 2, 2] keeps 4 of them.
    # After 12 blocks: sink = block 0, recent = blocks 10-11, mid = the 8 newest of blocks 1-9.
    assert {name: (t["blocks"], t["tokens"]) for name, t in last.items()} == {
        "sink": (1, 16),
        "mid": (8, 8 * 4),
        "recent": (2, 2 * 16),
    }
    assert (out / "video.mp4").stat().st_size > 0 and (out / "memory.png").exists()


def test_cli_plugins_lists_the_template(installed_template):
    command = [sys.executable, "-m", "packforcing", "plugins", "--kind", "compressor", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(installed_template))
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["strided"]["distribution"] == "packforcing-strided" and rows["strided"]["version"] == "0.1.0"
    assert rows["strided"]["kind"] == "compressor"


def test_template_own_test_suite_passes(installed_template):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEMPLATE / "tests")]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(installed_template), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# ---------------------------------------------------------------------- one table of kinds
def test_every_part_reads_the_table_of_kinds():
    from packforcing.cli import build_parser
    from packforcing.core.build import BuildEnv
    from packforcing.core.config import COMPONENT_KEYS, DEFAULT_COMPONENTS, OPTIONAL_COMPONENTS
    from packforcing.plugins import hookspecs
    from packforcing.plugins.kinds import KINDS

    registry, _ = create()
    assert [k.name for k in KINDS] == list(COMPONENT_KEYS)
    assert {k.name: k.default for k in KINDS if k.default} == DEFAULT_COMPONENTS
    assert {k.name for k in KINDS if k.optional} == set(OPTIONAL_COMPONENTS)
    specs = {name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "packforcing_spec", None)}
    assert specs == {k.hook for k in KINDS} | {old for k in KINDS for old in k.deprecated_hooks}
    assert all(k.hook == f"packforcing_{k.plural}" for k in KINDS)
    assert {k.name: k.plural for k in KINDS if k.plural != f"{k.name}s"} == {"policy": "policies"}
    assert {p.kind for p in registry.providers()} == {k.name for k in KINDS}
    fields = {f.name for f in attrs.fields(BuildEnv)}
    for k in KINDS:
        assert k.name in fields
        base = k.base_class()
        classes = [p.factory.component for p in registry.providers() if p.kind == k.name and p.factory.component]
        assert all(issubclass(c, base) for c in classes) or getattr(base, "_is_protocol", False)
        assert base.__name__ in hookspecs.__dict__[k.hook].__doc__
    plugins = build_parser()._subparsers._group_actions[0].choices["plugins"]
    (kind_option,) = [a for a in plugins._actions if a.dest == "kind"]
    assert kind_option.choices == [k.name for k in KINDS]


def test_kinds_are_built_in_table_order():
    """Each factory sees in its BuildEnv exactly the kinds listed before its own."""
    from packforcing.plugins.kinds import KINDS

    seen: dict[str, set[str]] = {}

    def spy(kind):
        def build(params, env):
            seen[kind.name] = {k.name for k in KINDS if getattr(env, k.name) is not None}
            return Registry.create(entry_points=False).build(kind.name, default[kind.name], params, env)

        return build

    default = {"model": "tiny_dit", "backend": "sdpa", "realigner": "identity", "selector": "recency",
               "compressor": "pool", "sampler": "euler", "policy": "packforcing"}  # fmt: skip
    builtins = Registry.create(entry_points=False)
    hooks = {
        k.hook: (lambda k=k: {"spy": ComponentFactory(builtins.factory(k.name, default[k.name]).params, spy(k))})
        for k in KINDS
    }
    registry, problems = create((plugin("spies", **hooks), "spy-dist"))
    assert problems == []
    config = {k.name: {"name": "spy"} for k in KINDS}
    config["policy"] = {"name": "spy", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 2}
    config["selector"] = {"name": "spy", "k": 1}
    pf.build_engine({**config, "run": {"device": "cpu"}}, registry=registry)
    order = [k.name for k in KINDS]
    assert seen == {key: set(order[:i]) for i, key in enumerate(order)}


def test_the_deprecated_backend_hook_still_registers_backends():
    """A plugin written for ``packforcing_attention_backends`` keeps working: its backends join the
    ``backend`` kind, next to those of ``packforcing_backends``, with a DeprecationWarning."""

    def old_hook():
        return {"old_sdpa": no_params(lambda env: SdpaBackend(), "an old plugin's backend")}

    def new_hook():
        return {"new_sdpa": no_params(lambda env: SdpaBackend(), "a new plugin's backend")}

    plugins = [
        (plugin("old_style", packforcing_attention_backends=old_hook), "old-dist"),
        (plugin("new_style", packforcing_backends=new_hook), "new-dist"),
    ]
    with pytest.warns(DeprecationWarning) as caught:
        registry = Registry.create(entry_points=False, extra_plugins=plugins)
        registry.providers()
    expected = "hook packforcing_attention_backends is deprecated: implement packforcing_backends instead (same result)"
    assert [str(w.message) for w in caught] == [expected]
    assert registry.problems == []
    assert {"old_sdpa", "new_sdpa", "sdpa", "auto"} <= set(registry.names("backend"))
    assert registry.get("backend", "old_sdpa").dist == "old-dist"
    config = {"policy": "full", "backend": "old_sdpa", "sampler": {"steps": 1}, "run": {"device": "cpu", "blocks": 1}}
    engine = pf.build_engine(config, registry=registry)
    assert isinstance(engine.policy.backend, SdpaBackend) and engine.policy.backend.name == "old_sdpa"


def test_builtins_are_listed_without_loading_and_load_as_listed():
    """The built-ins register by import path (nothing imported to list them); loading one gives
    the factory the listing describes: a class's docstring line is its listed description."""
    from packforcing.plugins.factory import LazyFactory, first_doc_line
    from packforcing.plugins.kinds import BY_NAME

    registry = Registry.create(entry_points=False)
    for provided in registry.providers():
        assert isinstance(provided.entry, LazyFactory), provided.name
        factory = provided.factory
        assert factory.name == provided.name and factory.description == provided.description
        if factory.component is not None:
            assert issubclass(factory.component, BY_NAME[provided.kind].base_class())
        if not provided.entry.target.startswith("packforcing.plugins.builtin_factories:"):  # a class
            assert provided.description == first_doc_line(factory.component)


def test_a_plugin_registered_by_import_path_is_listed_without_importing_it(tmp_path, monkeypatch):
    """A hook may name its component by import path (``LazyFactory``, from the torch-free
    ``packforcing.plugins``): ``packforcing plugins`` lists it with its description without
    importing the module; a config using it imports it, checked against the kind's interface."""
    from packforcing.plugins import LazyFactory

    (tmp_path / "lazy_plugin_mod.py").write_text(
        "from packforcing.api import Compressor\n"
        "from packforcing.compressors.pool import PoolCompressor\n"
        "class Halving(PoolCompressor):\n"
        '    """Halving pool (a plugin imported when used)."""\n'
        "class NotACompressor:\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = {
        "halving": LazyFactory("lazy_plugin_mod:Halving", "halving pool, listed without importing"),
        "wrong": LazyFactory("lazy_plugin_mod:NotACompressor", "not a compressor"),
    }
    registry, problems = create((plugin("lazy", packforcing_compressors=lambda: lazy), "lazy-dist"))
    assert problems == [] and registry.get("compressor", "halving").description == (
        "halving pool, listed without importing"
    )
    assert "lazy_plugin_mod" not in sys.modules
    config = {
        "policy": "packforcing",
        "compressor": "halving",
        "selector": {"name": "recency", "k": 1},
        "run": {"device": "cpu"},
    }
    engine = pf.build_engine(config, registry=registry)
    assert type(engine.policy.tier_compressor("mid")).__name__ == "Halving" and "lazy_plugin_mod" in sys.modules
    with pytest.raises(pf.PluginError) as info:  # one line naming it, not a traceback
        pf.build_engine({**config, "compressor": "wrong"}, registry=registry)
    assert str(info.value) == (
        "compressor 'wrong' (distribution lazy-dist): cannot be loaded from lazy_plugin_mod:NotACompressor: "
        "returned class NotACompressor for 'wrong', expected a ComponentFactory or a subclass of Compressor"
    )
    (tmp_path / "raising_plugin_mod.py").write_text("raise RuntimeError('broken at import')\n")
    lazy["raising"] = LazyFactory("raising_plugin_mod:Thing", "a module that raises when imported")
    lazy["gone"] = LazyFactory("no_such_plugin_mod:Thing", "a module that is not installed")
    registry, _ = create((plugin("lazy", packforcing_compressors=lambda: lazy), "lazy-dist"))
    with pytest.raises(
        pf.PluginError, match=r"^compressor 'gone' \(distribution lazy-dist\): cannot be loaded from no_such"
    ):
        check_config({**config, "compressor": "gone"}, registry=registry)
    with pytest.raises(pf.PluginError, match=r"cannot be loaded from raising_plugin_mod:Thing: broken at import$"):
        check_config({**config, "compressor": "raising"}, registry=registry)


# ---------------------------------------------------------------------- a plugin raising while it is built
@attrs.frozen
class DividesByStride(Halves):
    """Keep every stride-th temporal token; output_grid divides by the stride (0 raises)."""

    stride: int = 2

    def output_grid(self, grid):
        return (-(-grid[0] // self.stride), grid[1], grid[2])


class BrokenInit(PoolCompressor):
    """A constructor that raises something other than a ValueError."""

    def __init__(self, params: PoolParams) -> None:
        raise KeyError("missing")


@pytest.mark.parametrize(
    ("component", "compressor", "expected"),
    [
        (DividesByStride, {"stride": 0}, "raised ZeroDivisionError: integer division or modulo by zero"),
        (BrokenInit, {}, "raised KeyError: 'missing'"),
    ],
    ids=["output_grid", "constructor"],
)
def test_a_plugin_raising_while_built_is_one_line_naming_it(component, compressor, expected, capsys, tmp_path):
    """Any exception a plugin raises while the config is built (its constructor, or a method the
    policy calls to lay out its tiers) is one ``PluginError`` line naming the plugin and its
    distribution: no traceback, and not blamed on the policy that called it."""
    registry, _ = create((plugin("raiser", packforcing_compressors=lambda: {"raiser": component}), "raiser-dist"))
    config = {
        "policy": "packforcing",
        "selector": {"name": "recency", "k": 1},
        "compressor": {"name": "raiser", **compressor},
        "run": {"device": "cpu"},
    }
    with pytest.raises(pf.PluginError) as info:
        pf.build_engine(config, registry=registry)
    assert str(info.value) == f"compressor 'raiser' (distribution raiser-dist): {expected}"
    with pytest.raises(pf.PluginError, match="distribution raiser-dist"):
        check_config(config, registry=registry)  # validate / plan: the same line


class NegativeBudget(RecencySelector):
    """Claims a negative number of picks once a tier holds three blocks."""

    def budget(self, num_candidates: int) -> int:
        return -1 if num_candidates >= 3 else min(self.params.k, num_candidates)


class RaisingBudget(RecencySelector):
    def budget(self, num_candidates: int) -> int:
        raise RuntimeError("no budget")


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        (NegativeBudget, "budget(3) must be an int in [0, 3], at least budget(2) = 1; got -1"),
        (RaisingBudget, "raised RuntimeError: no budget"),
    ],
    ids=["negative", "raising"],
)
def test_a_selector_budget_out_of_range_is_refused_when_built(component, expected):
    """The planner and the contexts size themselves by ``budget(n)``: a selector whose budget is
    not an int in [0, n] (or raises) is one line naming it when the config is built, not a
    confusing failure blocks later."""
    registry, _ = create((plugin("budget", packforcing_selectors=lambda: {"budget": component}), "budget-dist"))
    config = {
        "policy": {"name": "packforcing", "mid_capacity_blocks": 4},
        "compressor": {"name": "pool"},
        "selector": {"name": "budget", "k": 1},
        "run": {"device": "cpu"},
    }
    with pytest.raises(pf.PluginError) as info:
        check_config(config, registry=registry)  # validate / plan
    assert str(info.value) == f"selector 'budget' (distribution budget-dist): {expected}"
    with pytest.raises(pf.PluginError, match="distribution budget-dist"):
        pf.build_engine(config, registry=registry)


class LateBadBudget(RecencySelector):
    """A budget that goes wrong past the sizes the build checks (64 for an unbounded tier)."""

    def budget(self, num_candidates: int) -> int:
        return num_candidates + 1 if num_candidates >= 66 else min(self.params.k, num_candidates)


def test_a_selector_budget_that_goes_wrong_later_is_one_line_in_the_plan_and_the_run():
    """An unbounded ``select`` tier outgrows what the build checks: the plan, and the run when it
    gets there, still refuse the bad ``budget(n)`` in one line naming the selector and block."""
    registry, _ = create((plugin("late", packforcing_selectors=lambda: {"late": LateBadBudget}), "late-dist"))
    config = {
        "model": {"name": "tiny_dit", "hidden_size": 16, "num_heads": 2, "num_layers": 1,
                  "latent_height": 2, "latent_width": 2, "frames_per_block": 1},
        "policy": {"name": "tiered", "tiers": [{"name": "history", "select": True}]},
        "selector": {"name": "late", "k": 1},
        "backend": "sdpa",
        "sampler": {"steps": 1},
        "run": {"device": "cpu", "dtype": "float32"},
    }  # fmt: skip
    engine = pf.build_engine(config, registry=registry)
    expected = "selector 'late' (distribution late-dist): budget(66) must be an int in [0, 66]; got 67"
    with pytest.raises(pf.PluginError) as info:
        engine.policy.plan(70)
    assert str(info.value) == expected
    assert engine.policy.plan(66).context_tokens == engine.policy.plan(10).context_tokens  # k = 1 block
    blocks = engine.generate(70, seed=0)
    for _ in range(66):
        next(blocks)
    with pytest.raises(pf.PluginError) as info:
        next(blocks)
    assert str(info.value) == expected.replace("):", "), block 66:")


def test_block_model_documents_every_attribute_the_library_reads():
    """A model written from ``packforcing.api`` alone learns every attribute the engine and the
    CLI read from it, the optional ones probed by name included."""
    from packforcing.api import BlockModel, LatentCodec

    doc = " ".join(
        (getattr(BlockModel, m).__doc__ or "") for m in ("encode_condition", "denoise", "clean_kv", "project_kv")
    )
    doc = " ".join(f"{BlockModel.__doc__} {doc}".split())
    optional = ("condition_keys", "condition_in_keys", "default_conditions", "pixel_frames_per_latent", "num_scenes")
    for name in (*BlockModel.__annotations__, *optional):
        assert f"``{name}" in doc, name
    assert "from_env" in doc and "reference_generate" in doc
    codec_doc = " ".join((LatentCodec.__doc__ or "").split())
    assert "``stride``" in codec_doc and "``temporal_stride``" in codec_doc  # the codec's optional attributes
