"""``packforcing sweep``: job expansion, results and summary, and small local sweeps on Ray."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from packforcing.cli import main
from packforcing.core.errors import ConfigError
from packforcing.sweep import ResultsFile, expand_jobs, load_prompts, parse_seeds, summarize
from packforcing.sweep.jobs import Prompt, config_names
from packforcing.sweep.runner import execute

TINY = ["sampler.steps=2"]
"""A ``--set`` every job gets (the configs say 3 steps)."""

CONFIGS = {
    "full": """# tiny, untrained tiny_dit with the full cache
model: {name: tiny_dit, hidden_size: 32, num_heads: 2, num_layers: 2, latent_height: 4, latent_width: 4}
policy: {name: full}
backend: {name: sdpa}
sampler: {steps: 3}
run: {blocks: 16, device: auto}
""",
    "sink_recent": "extends: full.yaml\npolicy: {name: sink_recent, sink_frames: 4, window_frames: 4}\n",
    "sliding_window": "extends: full.yaml\npolicy: {name: sliding_window, window_frames: 8}\n",
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The sweep's config files, written for the module: name -> path."""
    root = tmp_path_factory.mktemp("configs")
    for name, text in CONFIGS.items():
        (root / f"{name}.yaml").write_text(text)
    return {name: str(root / f"{name}.yaml") for name in CONFIGS}


def _latents(run_dir):
    """All blocks' latents ``[B, C, F, H, W]`` a run wrote with ``--save-latents``."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "latents.safetensors"))["latents"]


def _sets(overrides=TINY):
    return [arg for o in overrides for arg in ("--set", o)]


# ---------------------------------------------------------------------- jobs, without Ray
def test_seeds_and_config_names():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5,1,4") == [3, 4, 5, 1]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("1,x")
    assert parse_seeds("0-99999") == list(range(100_000))
    for text, problem in (("0-99999999999", "names more than 100,000 seeds"), ("0,1-100000", "more than 100,000"),
                          (str(2**63), "is not a valid seed")):  # fmt: skip
        with pytest.raises(ValueError, match=problem):
            parse_seeds(text)  # at once: no list of billions of seeds
    assert config_names(["configs/full.yaml", "configs/sink_recent.yaml"]) == ["full", "sink_recent"]
    assert config_names(["configs/packforcing.yaml", "configs/wan1.3b/packforcing.yaml"]) == [
        "configs_packforcing",
        "wan1.3b_packforcing",
    ]


@pytest.mark.parametrize(
    ("option", "value"), [("--seeds", "3-1"), ("--seeds", "1-a"), ("--seeds", ""), ("--seeds", "0-99999999999"),
                          ("--retries", "-1"), ("--retries", "x")],
)  # fmt: skip
def test_bad_seeds_and_retries_are_a_usage_error(cfg, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", cfg["full"], option, value, "--blocks", "1", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and f"argument {option}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prompt_files(cfg, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# VBench-style list\na red fox runs\n\na city at night, rain\n")
    prompts = load_prompts(txt)
    assert [p.name for p in prompts] == ["a_red_fox_runs", "a_city_at_night_rain"]
    assert prompts[0].schedule == ({"from_block": 0, "prompt": "a red fox runs"},)
    yml = tmp_path / "p.yaml"
    yml.write_text(
        "- {scene: 2}\n- {name: cut, schedule: [{from_block: 0, scene: 0}, {from_block: 4, scene: 1}]}\n- hello\n"
    )
    prompts = load_prompts(yml)
    assert [p.name for p in prompts] == ["scene2", "cut", "hello"]
    assert prompts[1].schedule == ({"from_block": 0, "scene": 0}, {"from_block": 4, "scene": 1})
    timed = tmp_path / "timed.yaml"
    timed.write_text(
        "- {name: cut, schedule: [{from_second: 0, scene: 0}, {from_second: 1.5, scene: 1}]}\n"
        "- {name: emb, embeds: e/p0.safetensors}\n"
    )
    cut, emb = load_prompts(timed)
    assert emb.schedule == ({"from_block": 0, "embeds": str(tmp_path / "e/p0.safetensors")},)
    # seconds become blocks per config: 1.5 s at 16 fps = pixel frame 24 = latent frame 24 → block 6
    conditioned = [*TINY, "model.num_conditions=2"]  # scenes need a conditioned model (checked up front)
    (job,) = expand_jobs([cfg["full"]], prompts=[cut], blocks=8, overrides=conditioned)
    assert job.prompt.schedule == ({"from_block": 0, "scene": 0}, {"from_block": 6, "scene": 1})
    # a schedule may mix from_second and from_block starts, as generate's --prompts file may
    timed.write_text("- {name: mix, schedule: [{from_second: 0, scene: 0}, {from_second: 1, scene: 1},"
                     " {from_block: 6, scene: 0}]}\n")  # fmt: skip
    (mixed,) = load_prompts(timed)
    (job,) = expand_jobs([cfg["full"]], prompts=[mixed], blocks=8, overrides=conditioned)
    assert job.prompt.schedule == ({"from_block": 0, "scene": 0}, {"from_block": 4, "scene": 1},
                                   {"from_block": 6, "scene": 0})  # fmt: skip
    with pytest.raises(ConfigError, match=r"\[2\].from_block: starts must increase, got 4"):  # once converted
        expand_jobs([cfg["full"]], prompts=[Prompt("late", ({"from_second": 0, "scene": 0},
                    {"from_second": 1.5, "scene": 1}, {"from_block": 4, "scene": 0}))], blocks=8,
                    overrides=conditioned)  # fmt: skip
    timed.write_text("- {schedule: [{from_second: 0, scene: 0}, {from_second: 0, scene: 1}]}\n")
    with pytest.raises(ConfigError, match=r"timed.yaml: \[0\]: schedule\[1\].from_second: must be greater than 0"):
        load_prompts(timed)
    bad = tmp_path / "dup.yaml"
    bad.write_text("- {name: a, scene: 1}\n- {name: a, scene: 2}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: \[1\]: prompt name 'a' repeats item \[0\]"):
        load_prompts(bad)
    bad.write_text("- {name: a, schedule: [{from_block: 0, scene: 1}, {from_block: 0, scene: 2}]}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: \[0\]: schedule\[1\].from_block: must be greater"):
        load_prompts(bad)
    bad.write_text("{scene: 1}\n")
    with pytest.raises(ConfigError, match="expected a list of prompts"):
        load_prompts(bad)


def test_expand_jobs_cross_product_and_keys(cfg):
    configs = [cfg["full"], cfg["sink_recent"]]
    prompts = [Prompt("a", ({"from_block": 0, "scene": 0},)), Prompt("b", ({"from_block": 0, "scene": 1},))]
    jobs = expand_jobs(configs, prompts=prompts, seeds=[0, 1], blocks=3, overrides=[*TINY, "model.num_conditions=2"])
    assert len(jobs) == 2 * 2 * 2
    assert [j.name for j in jobs[:4]] == ["full-a-0", "full-a-1", "full-b-0", "full-b-1"]
    assert len({j.key for j in jobs}) == 8
    # one config hash per config: seeds, length and prompts are matched on their own
    assert len({j.config_hash for j in jobs if j.config_name == "full"}) == 1
    assert {j.policy for j in jobs} == {"full", "sink_recent"}
    assert jobs[0].job_overrides()[-4:] == [
        "run.device=cpu",
        "run.seed=0",
        "run.blocks=3",
        'run.prompts=[{"from_block":0,"scene":0}]',
    ]
    # a different resolved config is a different job, even under the same file name
    other = expand_jobs(
        configs[:1], seeds=[0], blocks=3, overrides=[*TINY, "model.num_conditions=2", "sampler.steps=3"]
    )
    assert other[0].config_hash != jobs[0].config_hash
    # the length defaults to run.blocks; a bad config is one located error before anything runs
    assert expand_jobs(configs[:1], overrides=TINY)[0].blocks == 16
    with pytest.raises(ConfigError, match=r"--set: policy.window_frames"):
        expand_jobs(configs[1:], overrides=[*TINY, "policy.window_frames=-1"])


def test_preset_names_work_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = expand_jobs(["full", "sink_recent"], blocks=1, overrides=[*TINY, "model.weights=null"])
    assert [j.name for j in jobs] == ["full-default-0", "sink_recent-default-0"]
    assert all(Path(j.config_path).is_absolute() and Path(j.config_path).is_file() for j in jobs)


def test_seconds_convert_with_the_geometry(cfg):
    jobs = expand_jobs([cfg["full"]], seconds=2.0, overrides=TINY)
    # 2 s at 16 fps = 32 frames, one latent frame each, 4 frames per block
    assert jobs[0].blocks == 8


def test_an_out_that_cannot_be_a_directory_is_one_line(cfg, tmp_path, capsys):
    """--out is checked before configs are loaded or Ray started: no raw errno."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, problem in ((afile, "exists and is not a directory"), (afile / "sub", f"{afile} is not a directory")):
        assert main(["sweep", cfg["full"], "--blocks", "1", "--out", str(out), "--json"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: --out {out}: ")
        assert captured.err.strip().endswith(problem) and "Errno" not in captured.err
    assert afile.read_text() == "x"


def test_without_ray_the_sweep_is_one_line_and_leaves_nothing(cfg, tmp_path, capsys, monkeypatch):
    """A base install (no [sweep] extra): the one-line hint comes before the plan line, and the
    sweep directory is not created."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "sw"
    assert main(["sweep", cfg["full"], "--blocks", "1", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: sweeps need Ray: pip install 'packforcing[sweep]'\n"
    assert not out.exists()


@pytest.mark.parametrize("mode", ["--no-progress", "--json", None])
def test_each_failed_job_is_one_line_on_stderr_once(cfg, tmp_path, capsys, monkeypatch, mode):
    """A failed job is one stderr line as it finishes (bar or not), never repeated at the end;
    with --json, stdout's JSON has it and stderr does not."""
    import packforcing.sweep
    from packforcing.sweep import Progress, SweepResult

    def fake_run_sweep(jobs, out, *, on_start, on_progress, **kwargs):
        record = {**jobs[0].as_record(), "status": "failed", "error": "boom"}
        on_start(1, 0)
        on_progress(Progress(1, 1, 0, 1, record))
        return SweepResult(1, 0, 0, 1, [record], {"metrics": [], "rows": [], "failures": []})

    monkeypatch.setattr(packforcing.sweep, "run_sweep", fake_run_sweep)
    args = ["sweep", cfg["full"], "--blocks", "1", "--out", str(tmp_path), *([mode] if mode else [])]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("failed: full-default-0: boom") == (0 if mode == "--json" else 1)


def test_a_condition_the_model_does_not_take_is_refused_before_any_job(cfg, tmp_path, capsys):
    """Checked by the planning model as generate checks it, not left to fail every job."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- {name: ok, scene: 1}\n- {name: bad, embeds: missing.safetensors}\n")
    sets = ["model.num_conditions=2"]
    with pytest.raises(ConfigError, match=r"prompt 'bad': \[0\]\.embeds: unknown condition key"):
        expand_jobs([cfg["full"]], prompts=load_prompts(prompts), blocks=1, overrides=sets)
    out = tmp_path / "out"
    args = ["sweep", cfg["full"], "--prompts", str(prompts), "--blocks", "1", *_sets(sets), "--out", str(out)]
    assert main(args) == 2
    assert "prompt 'bad'" in capsys.readouterr().err and not out.exists()
    assert len(expand_jobs([cfg["full"]], prompts=load_prompts(prompts)[:1], blocks=1, overrides=sets)) == 1
    with pytest.raises(ConfigError, match=r"prompt 'ok': \[0\]\.scene: model tiny_dit is unconditional"):
        expand_jobs([cfg["full"]], prompts=load_prompts(prompts)[:1], blocks=1)
    # a text prompt for a model that takes none is refused as well (before any text encoder)
    texts = tmp_path / "texts.txt"
    texts.write_text("a red fox\n")
    with pytest.raises(ConfigError, match=r"\[0\]\.prompt: model tiny_dit takes no text prompts \(it takes scene\)"):
        expand_jobs([cfg["full"]], prompts=load_prompts(texts), blocks=1, overrides=sets)


def test_failed_job_is_one_line_record(cfg, tmp_path):
    (job,) = expand_jobs([cfg["full"]], blocks=1, overrides=TINY)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / job.name).write_text("a file where the run directory should be")
    record = execute(job, str(tmp_path))
    assert record["status"] == "failed"
    assert "\n" not in record["error"] and record["error"].endswith("exists and is not a directory")
    assert record["job"] == "full-default-0" and record["seed"] == 0 and record["blocks"] == 1


def test_an_interrupted_job_resumes_bit_exactly(cfg, tmp_path):
    from packforcing.cli.generate import Interrupted, run_job
    from packforcing.sweep.runner import claim, resumable

    (job,) = expand_jobs([cfg["sink_recent"]], blocks=6, overrides=TINY, save_latents=True)
    run_dir = tmp_path / "sweep" / "runs" / job.name

    def stop(blocks_done):
        if blocks_done == 3:
            raise KeyboardInterrupt  # as Ctrl-C, or Ray cancelling the task, would

    claim(job, run_dir)  # what the sweep does before it starts the job
    with pytest.raises(Interrupted):
        run_job(job.config_path, run_dir, overrides=job.job_overrides(), save_latents=True, on_block=stop)
    assert json.loads((run_dir / "report.json").read_text())["status"] == "interrupted"
    # only this job resumes it: the same directory name under another config is a new run
    (other,) = expand_jobs([cfg["sink_recent"]], blocks=6, overrides=[*TINY, "sampler.steps=3"])
    assert other.name == job.name and resumable(job, run_dir) and not resumable(other, run_dir)

    record = execute(job, str(tmp_path / "sweep"))
    assert record["status"] == "complete" and record["resumed"] is True and record["blocks_done"] == 6
    alone = tmp_path / "alone"
    argv = ["generate", "--config", job.config_path, *_sets(job.job_overrides()), "--out", str(alone)]
    assert main([*argv, "--save-latents", "--no-progress"]) == 0
    assert torch.equal(_latents(run_dir), _latents(alone))
    assert _latents(run_dir).shape[2] == 6 * 4  # every block once


def test_results_file_and_summary(cfg, tmp_path):
    configs = [cfg["full"], cfg["sink_recent"]]
    jobs = expand_jobs(configs, seeds=[0, 1, 2], blocks=2, overrides=TINY)
    results = ResultsFile(tmp_path / "results.jsonl")
    peaks = {}
    for i, job in enumerate(jobs):
        if job.name == "sink_recent-default-2":
            results.append({**job.as_record(), "status": "failed", "error": "boom"})
            continue
        peaks[job.name] = 1000 * (i + 1)
        fidelity = {"return_psnr_db": 20.0 + i}
        results.append(
            {**job.as_record(), "status": "complete", "peak_cache_bytes": peaks[job.name], "fidelity": fidelity}
        )
    # a sweep killed mid-write leaves a torn last line: ignored, and the next line starts fresh
    with results.path.open("a") as f:
        f.write('{"job": "torn')
    assert len(results.read()) == 6
    results.append({**jobs[0].as_record(), "status": "complete", "peak_cache_bytes": 7, "fidelity": {}})
    assert len(results.read()) == 7
    assert results.complete_keys() == {j.key for j in jobs if j.name != "sink_recent-default-2"}
    summary = summarize(jobs, results.latest())
    full, sink = summary["rows"]
    assert (full["complete"], full["failed"], sink["complete"], sink["failed"]) == (3, 0, 2, 1)
    full_peaks = [7, peaks["full-default-1"], peaks["full-default-2"]]  # the latest line of full-default-0 counts
    assert full["stats"]["peak_cache_bytes"]["mean"] == pytest.approx(statistics.fmean(full_peaks))
    assert full["stats"]["peak_cache_bytes"]["std"] == pytest.approx(statistics.stdev(full_peaks))
    assert sink["stats"]["fidelity.return_psnr_db"]["n"] == 2
    assert ["fidelity.return_psnr_db", "return PSNR dB"] in summary["metrics"]
    assert summary["failures"] == [{"job": "sink_recent-default-2", "status": "failed", "error": "boom"}]


# ---------------------------------------------------------------------- sweeps on a local Ray
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (sweeps reuse it instead of starting their own):
    2 CPUs, and 2 GPUs declared as resources (there are none: only Ray's bookkeeping of them)."""
    import ray

    ray.init(
        address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    yield ray
    ray.shutdown()


def test_sweep_runs_like_generate_skips_on_rerun_and_records_failures(local_ray, cfg, tmp_path, capsys):
    out = tmp_path / "sweep"
    configs = [cfg[name] for name in ("full", "sink_recent", "sliding_window")]
    # the two sliding_window jobs cannot create their run directory: they fail, the others go on
    (out / "runs").mkdir(parents=True)
    for seed in (0, 1):
        (out / "runs" / f"sliding_window-default-{seed}").write_text("in the way")
    args = ["sweep", *configs, "--seeds", "0,1", "--blocks", "3", *_sets(), "--out", str(out), "--save-latents"]
    assert main([*args, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["jobs"], result["complete"], result["failed"], result["skipped"]) == (6, 4, 2, 0)
    records = ResultsFile(out / "results.jsonl").read()
    assert len(records) == 6
    by_job = {r["job"]: r for r in records}
    for seed in (0, 1):
        failed = by_job[f"sliding_window-default-{seed}"]
        assert failed["status"] == "failed" and "\n" not in failed["error"]
        assert failed["error"].endswith("exists and is not a directory")

    complete = [r for r in records if r["status"] == "complete"]
    assert sorted(r["job"] for r in complete) == [
        "full-default-0",
        "full-default-1",
        "sink_recent-default-0",
        "sink_recent-default-1",
    ]
    for record in complete:
        # each job is exactly `packforcing generate` with the same config, seed and length
        run_dir = out / record["run_dir"]
        alone = tmp_path / "alone" / record["job"]
        config = cfg[record["config"]]
        overrides = _sets([*TINY, "run.device=cpu", "run.threads=1"])  # a job holds 1 CPU: 1 thread
        assert record["command"].endswith(f"{' '.join(overrides[-2:])} --out {run_dir} --overwrite --save-latents "
                                          "--no-progress")  # fmt: skip
        assert main(["generate", "--config", config, "--seed", str(record["seed"]), "--blocks", "3", *overrides,
                     "--out", str(alone), "--save-latents", "--no-progress"]) == 0  # fmt: skip
        assert torch.equal(_latents(run_dir), _latents(alone))
        ours, theirs = (json.loads((d / "report.json").read_text()) for d in (run_dir, alone))
        assert ours["config"] == theirs["config"]
        assert [b["cache_bytes"] for b in ours["blocks"]] == [b["cache_bytes"] for b in theirs["blocks"]]
        assert (run_dir / "video.mp4").read_bytes() == (alone / "video.mp4").read_bytes()
        assert (run_dir / "memory.png").exists()
        assert record["peak_cache_bytes"] == theirs["peak_cache_bytes"] > 0
        assert record["blocks_done"] == 3 and record["seconds"] > 0
    summary = (out / "summary.md").read_text()
    assert "| full | full | 3 | 2 / 0 |" in summary and "| sliding_window | sliding_window | 3 | 0 / 2 |" in summary
    assert "`sliding_window-default-0`: " in summary
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the rerun skips the four complete jobs and retries only the failed ones (now unblocked)
    capsys.readouterr()
    for seed in (0, 1):
        (out / "runs" / f"sliding_window-default-{seed}").unlink()
    assert main([*args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "6 jobs, 4 skipped (already complete" in captured.err
    assert "2 complete, 0 failed, 4 skipped" in captured.out
    latest = ResultsFile(out / "results.jsonl").latest()
    assert len(latest) == 6 and all(r["status"] == "complete" for r in latest.values())
    assert "| sliding_window | sliding_window | 3 | 2 / 0 |" in (out / "summary.md").read_text()


def test_dead_workers_are_retried_a_bounded_number_of_times(local_ray, cfg, tmp_path):
    from packforcing.sweep import run_sweep

    jobs = expand_jobs([cfg["full"]], seeds=[0, 1], blocks=1, overrides=TINY)
    marks = tmp_path / "marks"
    marks.mkdir()

    def crashing(job, out, threads):
        """Kills its worker process: seed 0 on every attempt, seed 1 on its first only."""
        import os

        from packforcing.sweep.runner import execute

        attempts = len(list(marks.glob(f"{job.name}.*")))
        (marks / f"{job.name}.{attempts}").touch()
        if job.seed == 0 or attempts == 0:
            os._exit(1)
        return execute(job, out, threads)

    result = run_sweep(jobs, tmp_path / "out", retries=1, execute_job=crashing)
    by_job = {r["job"]: r for r in result.records}
    assert by_job["full-default-1"]["status"] == "complete"
    assert by_job["full-default-0"]["status"] == "failed"
    assert by_job["full-default-0"]["error"].startswith("worker died 2 times (retried 1)")
    assert sorted(p.name for p in marks.iterdir()) == ["full-default-0.0", "full-default-0.1", "full-default-1.0",
                                                      "full-default-1.1"]  # fmt: skip


class _CancellingRay:
    """Ray as the sweep driver sees it when Ctrl-C lands while two jobs run: tasks are only
    recorded (nothing runs), ``wait`` reports none ready until the driver cancels, and then one
    cancelled task delivers its value while the other's value is lost (what a cancelled task's
    ``ray.get`` may do), its run having written ``report.json`` as an interrupted generate does.
    Real Ray's cancellation timing on a loaded 2-core machine made this test flaky."""

    class exceptions:  # the attribute path the driver reads: ray.exceptions.RayError
        RayError = RuntimeError

    def __init__(self) -> None:
        self.calls: dict[str, tuple] = {}
        self.cancelled: list[str] = []

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **kwargs):
                return self

            def remote(self, job, out, threads):
                ray.calls[job.name] = (job, out)
                return job.name

        return Task()

    def wait(self, refs, num_returns=1, timeout=None):
        return (list(refs), []) if self.cancelled else ([], list(refs))

    def cancel(self, ref):
        self.cancelled.append(ref)

    def get(self, ref, timeout=None):
        job, out = self.calls[ref]
        error = "interrupted (SIGINT) after 0 blocks"
        run_dir = Path(out) / "runs" / job.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text(json.dumps({"status": "interrupted", "blocks_done": 0, "error": error}))
        if job.seed == 1:
            raise RuntimeError("TaskCancelledError")  # the value is lost; the report is on disk
        return {**job.as_record(), "run_dir": f"runs/{job.name}", "status": "interrupted", "error": error}


def test_an_interrupted_sweep_records_its_interrupted_jobs(cfg, tmp_path, monkeypatch):
    """Ctrl-C on the sweep: the running jobs are cancelled (each stops as generate stops), and
    their "interrupted" records reach results.jsonl and the summary (not "not run"), also for a
    job whose value Ray does not deliver (read from its run's report.json)."""
    from packforcing.sweep import driver, run_sweep

    fake = _CancellingRay()
    monkeypatch.setattr(driver, "_ray", lambda: fake)
    jobs = expand_jobs([cfg["full"]], seeds=[0, 1], blocks=1, overrides=TINY)

    def ctrl_c(progress):
        if progress.running == 2:  # both jobs running
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(jobs, tmp_path / "out", on_progress=ctrl_c)
    assert sorted(fake.cancelled) == ["full-default-0", "full-default-1"]
    records = ResultsFile(tmp_path / "out" / "results.jsonl").read()
    assert sorted((r["job"], r["status"]) for r in records) == [("full-default-0", "interrupted"),
                                                                ("full-default-1", "interrupted")]  # fmt: skip
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| full | full | 1 | 0 / 2 |" in summary and "not run" not in summary
    assert "- `full-default-0` (interrupted): interrupted (SIGINT) after 0 blocks" in summary


def test_gpus_per_job_beyond_the_cluster_is_one_line(local_ray, cfg, tmp_path, capsys):
    config = cfg["full"]
    code = main(["sweep", config, "--blocks", "1", *_sets(), "--gpus-per-job", "3", "--out", str(tmp_path), "--json"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --gpus-per-job 3: the Ray cluster has 2 GPUs (leave it out to run on CPUs)"
    assert list(tmp_path.iterdir()) == []  # no runs/, and no summary of a sweep that never ran


def test_each_job_holds_a_gpu_of_its_own(local_ray, cfg, tmp_path):
    from packforcing.sweep import run_sweep

    jobs = expand_jobs([cfg["full"]], seeds=range(4), blocks=1, overrides=TINY, device="cuda")

    marks = tmp_path / "started"
    marks.mkdir()

    def pinned(job, out, threads):
        """Where the job would generate on ``cuda``: reports the devices Ray made visible to it
        (the first two jobs wait for each other, so two run at the same time)."""
        import os
        import time

        start = time.time()
        (marks / job.name).touch()
        while len(list(marks.iterdir())) < 2 and time.time() < start + 60:
            time.sleep(0.05)
        time.sleep(0.2)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {**job.as_record(), "status": "complete", "gpus": visible, "start": start, "end": time.time()}

    result = run_sweep(jobs, tmp_path, gpus_per_job=1, execute_job=pinned)
    assert result.complete == 4
    records = result.records
    assert all(r["device"] == "cuda" and r["gpus"] in ("0", "1") for r in records)
    overlapping = [
        (a, b) for a in records for b in records if a is not b and a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlapping and all(a["gpus"] != b["gpus"] for a, b in overlapping)
    assert all("run.device=cuda" in job.job_overrides() for job in jobs)


def test_report_figures_include_fidelity(tmp_path):
    from packforcing.sweep.runner import read_report

    report = {
        "blocks": [{"index": i} for i in range(4)],
        "peak_cache_bytes": 300,
        "full_cache_bytes": 1200,
        "total_seconds": 2.0,
        "returns": [
            {"block": 2, "condition": {"scene": 0}, "blocks_since": 1, "psnr_db": 30.0},
            {"block": 3, "condition": {"scene": 1}, "blocks_since": 2, "psnr_db": 20.0},
        ],
        "fidelity": {"drift": 0.25, "note": "text is skipped", "nested": {"x": 1}},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    figures = read_report(tmp_path)
    assert figures["cache_ratio"] == 0.25 and figures["ms_per_block"] == 500.0 and figures["blocks_done"] == 4
    assert figures["fidelity"] == {
        "drift": 0.25,
        "nested.x": 1.0,
        "return_psnr_db": 25.0,
        "min_return_psnr_db": 20.0,
        "returns": 2,
    }
    del report["returns"], report["fidelity"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert "fidelity" not in read_report(tmp_path)


def test_an_interrupted_job_is_recorded_from_its_report_when_ray_keeps_its_value(cfg, tmp_path):
    """A cancelled task's return value may not reach the driver; its run's report.json, which
    generate writes on Ctrl-C, gives the record instead (and nothing for a job that never ran)."""
    from packforcing.sweep.runner import interrupted_record

    job = expand_jobs([cfg["full"]], seeds=[0], blocks=1, overrides=TINY)[0]
    assert interrupted_record(job, str(tmp_path)) is None  # never started
    run_dir = tmp_path / "runs" / job.name
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps({"status": "complete", "blocks_done": 1}))
    assert interrupted_record(job, str(tmp_path)) is None
    (run_dir / "report.json").write_text(json.dumps({"status": "interrupted", "blocks_done": 3}))
    record = interrupted_record(job, str(tmp_path))
    assert record == {**job.as_record(), "run_dir": f"runs/{job.name}", "status": "interrupted",
                      "error": "interrupted after 3 blocks"}  # fmt: skip


class _FinishingRay(_CancellingRay):
    """Ray where every task has finished: its value is ``execute_job``'s record, computed here."""

    def __init__(self, execute_job) -> None:
        super().__init__()
        self.execute_job = execute_job

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs)[:num_returns], list(refs)[num_returns:]

    def get(self, ref, timeout=None):
        job, out = self.calls[ref]
        return self.execute_job(job, out)


def test_a_resumed_jobs_wall_time_sums_its_attempts(cfg, tmp_path, monkeypatch):
    """``total_seconds`` (the summary's "job wall s") of a job that resumed an interrupted run
    adds the seconds of the attempts since its last complete line; a job run afresh counts its
    own, and the lines of an earlier complete run of the job are not counted."""
    from packforcing.sweep import driver, run_sweep

    jobs = expand_jobs([cfg["full"]], seeds=[0, 1], blocks=1, overrides=TINY)
    results = ResultsFile(tmp_path / "out" / "results.jsonl")
    results.path.parent.mkdir(parents=True)
    first, second = jobs
    results.append({**first.as_record(), "status": "failed", "seconds": 100.0})
    results.append({**second.as_record(), "status": "failed", "seconds": 1.5})  # both before a resume
    results.append({**second.as_record(), "status": "interrupted", "seconds": 4.0})

    def execute_job(job, out):
        return {**job.as_record(), "status": "complete", "seconds": 2.0, "resumed": job is second}

    monkeypatch.setattr(driver, "_ray", lambda: _FinishingRay(execute_job))
    run_sweep(jobs, tmp_path / "out")
    latest = results.latest()
    assert (latest[first.key]["total_seconds"], latest[second.key]["total_seconds"]) == (2.0, 7.5)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# Sweep: 1 config × 1 prompt × 2 seeds\n")  # counted in words, singular at 1
    assert "| full | full | 1 | 2 / 0 |" in summary
    assert summarize(jobs, latest)["rows"][0]["stats"]["total_seconds"]["mean"] == pytest.approx(4.75)
    # once complete, a later resumed attempt of the same job starts counting afresh
    results.append({**second.as_record(), "status": "interrupted", "seconds": 3.0})
    assert results.unfinished_seconds() == {second.key: 3.0}


def test_a_resumed_jobs_wall_time_leaves_out_attempts_before_a_fresh_start(tmp_path):
    """An attempt that ran the job afresh (no checkpoint to resume: ``execute`` claimed the run
    directory anew) continued nothing before it: a later resumed attempt adds only the seconds
    from that fresh start on, not those of the failed attempt it replaced."""
    results = ResultsFile(tmp_path / "results.jsonl")
    job = {"config_hash": "h", "prompt_schedule": None, "seed": 0, "blocks": 4, "command": "packforcing generate"}
    results.append({**job, "status": "failed", "seconds": 100.0})  # no checkpoint: the next starts afresh
    results.append({**job, "status": "interrupted", "seconds": 4.0})  # afresh, checkpointed
    results.append({**job, "status": "interrupted", "seconds": 3.0, "resumed": True})
    assert list(results.unfinished_seconds().values()) == [7.0]


def test_gpus_per_job_without_local_gpus_is_refused_before_ray_starts(cfg, tmp_path, capsys, monkeypatch):
    from packforcing.sweep import driver

    class NotStarted(_CancellingRay):
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs):
            raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "_ray", NotStarted)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = ["sweep", cfg["full"], "--blocks", "1", *_sets(), "--gpus-per-job", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --gpus-per-job 1: this machine has 0 CUDA GPUs "
        "(leave it out to run on CPUs, or give --address of a Ray cluster with GPUs)"
    )
