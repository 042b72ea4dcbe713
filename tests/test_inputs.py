"""Bounded, safe inputs: config files, allocations and weight files are checked up front.

Each case reproduces a failure seen on main (an alias bomb eating 5 GB, a FIFO hanging the
loader, ``extends: /etc/shadow`` printing its first line, ``page_blocks: 1e12`` passing
``validate`` then trying to allocate petabytes, corrupt weights giving tracebacks).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

import packforcing as pf
from packforcing.cli import main
from packforcing.core.build import check_config
from packforcing.core.config import MAX_CONFIG_BYTES
from packforcing.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PACKFORCING = REPO / "configs" / "packforcing.yaml"


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        check_config(pf.load_config(path, overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def alias_bomb() -> str:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    text = alias_bomb()
    assert len(text.encode()) < 1024  # 10**9 strings once expanded
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    message = error_of(path)
    assert time.perf_counter() - started < 1.0
    assert message.startswith(f"{path}: YAML aliases expand to more than ") or "bomb.yaml: YAML aliases" in message


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("run: &r [1, *r]\n")
    assert "YAML aliases expand" in error_of(path)


def test_oversized_config_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert f"config files are limited to {MAX_CONFIG_BYTES} bytes" in error_of(path)


def test_dev_zero_is_refused_naming_it():
    assert error_of("/dev/zero") == "/dev/zero: is a device, not a regular file"


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    parent = tmp_path / "child.yaml"
    parent.write_text("extends: pipe.yaml\n")
    result: dict[str, str] = {}

    def load():
        result["top"] = error_of(fifo)
        result["extends"] = error_of(parent)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader so the test process can exit, then fail
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO config blocked")
    assert result["top"].endswith("pipe.yaml: is a FIFO, not a regular file")
    assert result["extends"].endswith("child.yaml: extends: pipe.yaml: is a FIFO, not a regular file")


def test_directory_given_to_extends_is_named(tmp_path):
    (tmp_path / "base.yaml").mkdir()
    path = tmp_path / "x.yaml"
    path.write_text("extends: [base.yaml]\n")
    assert error_of(path).endswith("x.yaml: extends[0]: base.yaml: is a directory, not a YAML file")


def test_non_config_contents_are_never_echoed(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("zqroot:$6$hunter2hash:19000:0:99999:7:::\nzquser:$6$other:19000:0:99999:7:::\n")
    path = tmp_path / "x.yaml"
    path.write_text(f"extends: {secret}\n")
    message = error_of(path)
    assert "hunter2" not in message and "zqroot" not in message
    assert message.endswith("not a YAML file (files given to extends end in .yaml or .yml)")
    # a .yaml file that is not a config: its keys are not echoed either
    renamed = tmp_path / "shadow.yaml"
    renamed.write_text(secret.read_text())
    message = error_of(renamed)
    assert "hunter2" not in message and "zqroot" not in message
    assert "a top-level key that is not a name" in message


def test_absurd_page_blocks_is_refused_by_validate_naming_key_and_bytes(capsys):
    status = main(["validate", str(REPO / "configs/full.yaml"), "--set", "policy.page_blocks=1000000000000"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: --set: policy.page_blocks: the cache would allocate ")
    planned = int(err.split("would allocate ")[1].split(" ")[0])
    config = pf.load_config(REPO / "configs/full.yaml", ["policy.page_blocks=1000000000000"])
    assert planned == pf.plan(config, num_blocks=config.run.blocks).bytes
    assert err.endswith("of cpu memory")


def test_a_batch_too_large_for_memory_is_blamed_on_the_batch(capsys):
    """Each video's cache fits; a million of them do not: the error names run.batch_size."""
    status = main(["validate", str(REPO / "configs/full.yaml"), "--set", "run.batch_size=1000000"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: --set: run.batch_size: the cache would allocate "), err
    assert " blocks × 1000000 videos, more than the " in err


def test_absurd_page_blocks_is_refused_before_generation(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", str(REPO / "configs/full.yaml"), "--blocks", "2", "--out", str(out)]
    status = main(["generate", *args, "--set", "policy.page_blocks=1000000000000", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: --set: policy.page_blocks: the cache would allocate "), err
    assert not (out / "video.mp4").exists()


# ---------------------------------------------------------------------- weights
def write_config(tmp_path: Path, weights: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        f"extends: {PACKFORCING}\ncompressor:\n  name: dual_branch\n  weights: {weights}\n"
        "  hr_channels: [8, 16, 32, 64]\n"
    )
    return path


def good_weights() -> bytes:
    from packforcing.compressors.dual_branch import PACKAGE_WEIGHTS

    return (PACKAGE_WEIGHTS / "dual_branch_tiny.safetensors").read_bytes()


def corrupt_variants(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    data = good_weights()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    variants: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "empty file"),
        "tiny": (b"abc", "truncated: 3 bytes"),
        "garbage": (b"\xff" * 64, "corrupt or truncated header"),
        "truncated": (data[: len(data) // 2], "truncated"),
        "text": (b"this is not a weights file at all, just text......", "not a safetensors file"),
    }
    out = {name: (tmp_path / f"{name}.safetensors", problem) for name, (_, problem) in variants.items()}
    for name, (blob, _) in variants.items():
        out[name][0].write_bytes(blob)
    # wrong shapes: same names and metadata, one tensor with another shape
    import torch

    meta = header["__metadata__"]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "good.safetensors")) if (tmp_path / "good.safetensors").exists() else None
    del tensors
    good = tmp_path / "good.safetensors"
    good.write_bytes(data)
    tensors = load_file(str(good))
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(*[d + 1 for d in tensors[first].shape])
    save_file(tensors, str(tmp_path / "shapes.safetensors"), metadata=meta)
    out["shapes"] = (tmp_path / "shapes.safetensors", f"tensor {first!r} has shape")
    # another architecture: metadata of a different network
    other = dict(meta, architecture=json.dumps({**json.loads(meta["architecture"]), "kernel": 5}))
    save_file(load_file(str(good)), str(tmp_path / "arch.safetensors"), metadata=other)
    out["arch"] = (tmp_path / "arch.safetensors", "was trained with kernel=5 (config: 3)")
    # not a dual_branch file at all
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    out["foreign"] = (tmp_path / "foreign.safetensors", "is not a dual_branch weight file")
    return out


def test_bad_weight_files_are_one_line_naming_key_and_file(tmp_path, capsys):
    for name, (path, problem) in corrupt_variants(tmp_path).items():
        config = write_config(tmp_path, path.name, f"{name}.yaml")
        status = main(["validate", str(config)])
        err = capsys.readouterr().err.strip()
        assert status == 2, name
        assert err.startswith(f"error: {config}: compressor.weights: ") and path.name in err, err
        assert problem in err, (name, err)
        assert "\n" not in err


def test_generate_reports_bad_weights_without_traceback(tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(good_weights()[:100])
    config = write_config(tmp_path, "w.safetensors")
    status = main(["generate", "--config", str(config), "--blocks", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith(f"error: {config}: compressor.weights: "), err
    assert "Traceback" not in err


def test_relative_weights_resolve_beside_the_config_first_then_cwd(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = write_config(configs, "w.safetensors")
    message = error_of(config)
    assert "compressor.weights: file not found: w.safetensors (looked for " in message
    assert f"{configs / 'w.safetensors'} and {cwd / 'w.safetensors'})" in message
    (cwd / "w.safetensors").write_bytes(good_weights())
    assert check_config(pf.load_config(config))  # found in the working directory
    (configs / "w.safetensors").write_bytes(b"")  # beside the config file wins
    assert "configs/w.safetensors: empty file" in error_of(config)


def test_the_shipped_config_states_that_lookup_order():
    words = " ".join((REPO / "configs/packforcing.yaml").read_text().replace("#", " ").split())
    assert "a plain path is looked up beside this file first, then in the working directory" in words


def test_absurd_block_count_is_refused_fast(tmp_path, capsys):
    """Planning 10**12 blocks would loop for days: refused at once, labelled by the option."""
    started = time.perf_counter()
    argv = ["generate", "--config", str(REPO / "configs/full.yaml"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--blocks", "1000000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --blocks: run.blocks: 1000000000000 blocks is more than the 10000000 a run may plan"
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "o").exists()


def test_bad_model_weights_are_one_line_naming_model_weights(tmp_path, capsys):
    (tmp_path / "m.safetensors").write_bytes(b"\x00" * 12)
    config = tmp_path / "m.yaml"
    config.write_text("model: {name: tiny_dit, weights: m.safetensors}\npolicy: full\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: model.weights: ") and "m.safetensors" in err, err
    assert "\n" not in err
