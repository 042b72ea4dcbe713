"""A build refused after its model is built drops the model before the error reaches the caller:
the error (kept, as an interactive session keeps the last one) does not keep the weights alive
through the build's frames in its traceback. The error itself is unchanged, and an internal bug
still shows where it happened."""

from __future__ import annotations

import gc
import traceback
import weakref
from pathlib import Path

import attrs
import pytest

import packforcing as pf
from packforcing.cli import main
from packforcing.core import build
from packforcing.core.build import check_config
from packforcing.plugins import ComponentFactory, hookimpl
from packforcing.plugins.manager import Registry

from .helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ROOT = Path(__file__).resolve().parent.parent


def config(**sections):
    return {
        "model": TINY_MODEL,
        "policy": {"name": "packforcing", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 2},
        "compressor": {"name": "pool", "window": [2, 1, 1]},
        "selector": {"name": "topk", "k": 1, "min_queries": 2},
        "backend": "sdpa",
        "sampler": {"steps": 1},
        "run": {"device": "cpu"},
        **sections,
    }


REFUSED = {
    # the compressor, built after the model, refuses a window larger than the model's token grid
    "component": (
        {"compressor": {"name": "pool", "window": [1, 16, 16]}},
        "compressor.window: window [1, 16, 16] is larger than the block's token grid [4, 2, 3]",
    ),
    # the policy's cross-check, once everything is built: the selector's k against the mid tier
    "cross-check": (
        {"selector": {"name": "topk", "k": 5, "min_queries": 2}},
        "selector.k: 5 is larger than the capacity of tier 'mid' it selects from (2 blocks)",
    ),
}


def refused_build(cfg, **kwargs):
    """Build ``cfg``, which must fail: ``(the error, a weak reference to the model it built)``."""
    models = []

    def wrap(kind, component):
        if kind == "model":
            models.append(weakref.ref(component))
        if "fail" in kwargs and kind == kwargs["fail"]:
            raise RuntimeError(f"a bug in the {kind} wrapper")
        return component

    try:
        pf.build_engine(cfg, wrap=wrap, registry=kwargs.get("registry"))
    except BaseException as exc:  # kept, like sys.last_value
        error = exc
    else:
        raise AssertionError("the build did not fail")
    gc.collect()
    assert len(models) == 1
    return error, models[0]


@pytest.mark.parametrize("where", sorted(REFUSED))
def test_a_refused_build_frees_its_model_while_the_error_is_kept(where):
    sections, _ = REFUSED[where]
    error, model = refused_build(config(**sections))
    assert isinstance(error, pf.ConfigError)
    assert model() is None


@pytest.mark.parametrize("where", sorted(REFUSED))
def test_the_refusal_is_unchanged(where):
    sections, message = REFUSED[where]
    error, _ = refused_build(config(**sections))
    assert type(error) is pf.ConfigError
    assert str(error) == message
    # still raised ``from None``: its cause hidden, the suppressed context kept (frames cleared)
    assert error.__cause__ is None and error.__suppress_context__ and error.__context__ is not None


@pytest.mark.parametrize("where", sorted(REFUSED))
def test_the_cli_still_prints_the_refusal_on_one_line(where, tmp_path, capsys):
    import yaml

    sections, message = REFUSED[where]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config(**sections)))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"


@attrs.frozen
class NoParams:
    pass


def _broken_compressor(params, env):
    raise RuntimeError("the broken compressor failed")


class _BrokenPlugin:
    @staticmethod
    @hookimpl
    def packforcing_compressors():
        return {"broken": ComponentFactory(NoParams, _broken_compressor)}


def test_a_failing_plugin_frees_the_model_and_stays_named():
    registry = Registry.create(entry_points=False, extra_plugins=[(_BrokenPlugin, "broken-plugin")])
    error, model = refused_build(config(compressor="broken"), registry=registry)
    assert isinstance(error, pf.PluginError) and "broken" in str(error) and "\n" not in str(error)
    assert model() is None
    # the plugin's own exception is still chained, its traceback naming the line that raised
    assert isinstance(error.__cause__, RuntimeError)
    shown = "".join(traceback.format_exception(error))
    assert "in _broken_compressor" in shown and 'raise RuntimeError("the broken compressor failed")' in shown


def test_an_internal_bug_frees_the_model_and_keeps_its_traceback():
    error, model = refused_build(config(), fail="policy")
    assert type(error) is RuntimeError and str(error) == "a bug in the policy wrapper"
    assert model() is None
    shown = "".join(traceback.format_exception(error))
    assert "in build_engine" in shown and "in wrap" in shown
    assert 'raise RuntimeError(f"a bug in the {kind} wrapper")' in shown


def test_an_internal_bug_in_the_cli_build_still_shows_its_traceback(tmp_path, monkeypatch):
    def broken_threads(*args):
        raise RuntimeError("a bug in apply_threads")

    monkeypatch.setattr(build, "apply_threads", broken_threads)
    argv = ["generate", "--config", str(ROOT / "configs" / "sink_recent.yaml"), "--blocks", "1"]
    argv += ["--set", "model.hidden_size=32", "--set", "model.num_layers=2", "--set", "model.weights=null"]
    with pytest.raises(RuntimeError, match="a bug in apply_threads") as info:
        main([*argv, "--set", "run.device=cpu", "--out", str(tmp_path / "out")])
    shown = "".join(traceback.format_exception(info.value))
    assert "in build_engine" in shown and "apply_threads(config.run.threads" in shown
    assert "in broken_threads" in shown


def test_a_refusal_after_the_caller_s_own_error_leaves_the_caller_s_frames_alone():
    """The build clears its own frames only: not those of an error the caller was handling."""

    class Held:
        pass

    def caller_failure():
        held = Held()
        holder.append(weakref.ref(held))
        raise KeyError("the caller's")

    holder = []
    try:
        caller_failure()
    except KeyError as outer:
        with pytest.raises(pf.ConfigError) as info:
            check_config(config(**REFUSED["cross-check"][0]))
        assert info.value.__context__.__context__ is outer  # the ParamError raised while handling it
        gc.collect()
        assert holder[0]() is not None  # still in caller_failure's frame, in outer's traceback
        assert outer.__traceback__ is not None
