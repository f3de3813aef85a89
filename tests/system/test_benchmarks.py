"""The benchmark runner behind ``make bench``: it runs a benchmark script and writes its REPORT.md section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402
from report_tools import run_bundle, write_report  # noqa: E402


def test_list_names_every_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_all.main(["--list", "--experiments"]) == 0
    listed = {line.split(":", 1)[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == {s.name for s in run_all.suites(cuda=False, outdir=ROOT / "outputs" / "bench")}


def test_unknown_suite_is_refused() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_suite", "--list"])


def test_ssl_step_run_becomes_a_report_section(tmp_path: Path) -> None:
    """A real (demo-size) ssl_step run: the JSON it prints is parsed and rendered as the section table."""
    run = run_all.Run("project fp32", ["benchmarks/ssl_step.py", "--size", "demo", "--crop", "16", "--steps", "1",
                                       "--warmup", "0", "--threads", "1"], {"OMP_NUM_THREADS": "1"})
    run_all.execute(run, tmp_path / "bench.log")
    assert run.result is not None and run.result["step_s_median"] > 0
    report = tmp_path / "REPORT.md"
    report.write_text("# Benchmarks\n\n## Latent cache\n\nkept\n")
    write_report(report, run_all.ssl_section([run]))
    text = report.read_text()
    assert "## Latent cache\n\nkept" in text
    assert "## SSL pretraining step (meduet_ssl)" in text
    assert f"| project fp32 | fp32 | cpu | {run.result['step_s_median']:.2f} |" in text


def test_ssl_step_counts_the_flops_of_every_pass() -> None:
    """--count-flops counts one step's matrix-product FLOPs, recomputation included: checkpointing the
    mixture and decoder passes adds their forward FLOPs again, and the authors' pass structure
    (decodes twice, encodes the clean batch twice) counts more than the project's without checkpoints."""
    import ssl_step

    threads = torch.get_num_threads()
    common = ["--size", "demo", "--crop", "16", "--steps", "1", "--warmup", "0", "--threads", "1", "--count-flops"]
    try:
        plain = ssl_step.main([*common, "--checkpointing", "none"])["step_flops"]
        checkpointed = ssl_step.main([*common, "--checkpointing", "mixture,decoder"])["step_flops"]
        reference = ssl_step.main([*common, "--passes", "reference"])["step_flops"]
    finally:
        torch.set_num_threads(threads)
    assert 0 < plain < checkpointed and plain < reference


def test_seg_inference_unit_costs_time_and_count_each_unit() -> None:
    """--unit-costs at demo size: the latent window runs with its image window (the default decoder
    reads it) and its FLOPs split into ViT, latent-grid and image-resolution decoder, which add up."""
    import seg_inference

    out = seg_inference.unit_costs(14, "tiny")
    window = out["latent_window_16"]
    split = out["latent_window_gflop_split"]
    assert window["wall_s"] > 0 and all(v > 0 for v in split.values())
    assert abs(sum(split.values()) - window["gflop"]) < 0.05
    assert out["vae_encode_64"]["gflop"] > 0 and out["swinunetr_window_64"]["gflop"] > 0


def test_failed_benchmark_stops_the_run(tmp_path: Path) -> None:
    run = run_all.Run("broken", ["benchmarks/ssl_step.py", "--batch", "3"])
    with pytest.raises(SystemExit, match="broken failed"):
        run_all.execute(run, tmp_path / "bench.log")


def test_run_logged_appends_each_run_under_its_header(tmp_path: Path) -> None:
    import sys

    from custom_nets.utils.proc import run_logged

    log = tmp_path / "logs" / "runs.log"
    ok = run_logged([sys.executable, "-c", "print('first line'); print('last line')"], log, "ok run")
    bad = run_logged([sys.executable, "-c", "import sys; print('partial'); sys.exit(3)"], log, "bad run")
    assert ok.returncode == 0 and ok.output.splitlines() == ["first line", "last line"] and ok.tail(1) == "last line"
    assert bad.returncode == 3 and bad.output.strip() == "partial"
    text = log.read_text()
    assert text.index("===== ok run") < text.index("last line") < text.index("===== bad run") < text.index("partial")


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make bench-gpu`'s script at its tiny size: one JSON line per measurement, each with its figures."""
    import gpu_bench

    out = tmp_path / "gpu_bench.jsonl"
    assert gpu_bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == lines  # every line is also saved
    assert not [ln for ln in lines if "error" in ln]
    ssl = [ln for ln in lines if ln["bench"] == "ssl_step"]
    assert [ln["passes"] for ln in ssl] == ["project", "reference"]
    assert all(ln["precision"] == "bf16" and ln["batch"] == 2 and ln["step_s_median"] > 0 for ln in ssl)
    gen = [ln for ln in lines if ln["bench"] == "generator"]
    assert [ln["precision"] for ln in gen] == ["fp32", "bf16"]
    for ln in gen:
        assert ln["samples_per_s"] == pytest.approx(ln["batch"] / (ln["s_per_step"] * ln["num_steps"]), rel=1e-2)
    seg = [ln for ln in lines if ln["bench"] == "seg_whole_ct"]
    assert [(ln["mode"], ln["vae"], ln["precision"]) for ln in seg] == [
        (mode, vae, precision) for mode, vae in (("latent", "blended"), ("latent", "exact-norm"), ("swinunetr", None))
        for precision in ("fp32", "bf16")]
    for ln in seg:
        assert ln["seconds"] >= ln["inference_s"] > 0 and ln["windows"] >= 2
        assert ln["original_shape"] == [64, 64, 40]  # the mask came back on the CT's own grid
    assert seg[0]["vae_encode_s"] > 0 and seg[4]["vae_encode_s"] is None
    assert [ln["vae_granularity"] for ln in seg[:4]] == [None, None, "norm", "norm"]
    assert len(lines) == 10 and all(ln["device"] == "cpu" for ln in lines)


def test_gpu_benchmark_halves_the_batch_on_out_of_memory() -> None:
    import gpu_bench

    def fits_at_16(batch: int) -> dict:
        if batch > 16:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: tried batch {batch}")
        return {"batch": batch}

    assert gpu_bench.largest_batch(fits_at_16, 64) == {"batch": 16, "batch_tried": [64, 32, 16]}
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu_bench.largest_batch(fits_at_16, 64, smallest=32)
    with pytest.raises(ValueError, match="not memory"):  # other errors are not retried
        gpu_bench.largest_batch(lambda b: (_ for _ in ()).throw(ValueError("not memory")), 64)


def test_run_bundle_appends_its_log_and_names_a_failure(tmp_path: Path) -> None:
    """The benchmarks' bundle runner keeps every command's output in one log and, on failure, stops
    with what failed, the log's path and its tail."""
    log = tmp_path / "runs" / "chain.log"
    run_bundle([sys.executable, "-c", "print('first run')"], log, "first")
    with pytest.raises(SystemExit, match=r"second failed \(exit 3\); see .*chain.log:\n(.|\n)*second run"):
        run_bundle([sys.executable, "-c", "print('second run'); raise SystemExit(3)"], log, "second")
    text = log.read_text()
    assert "first run" in text and "second run" in text and text.count("\n$ ") == 2


def test_bundle_run_command_runs_a_bundle_config_with_its_overrides(tmp_path: Path) -> None:
    """The argument list the benchmarks build runs through ``python -m monai.bundle run``: one config
    file as its path, several as a list (later ones override), each keyword as ``--<id> <value>``."""
    from report_tools import bundle_run_command

    base, overlay = tmp_path / "base.json", tmp_path / "overlay.json"
    base.write_text(json.dumps({"greeting": "base", "target": "nobody", "run": ["$print('said', @greeting, 'to', @target)"]}))
    overlay.write_text(json.dumps({"greeting": "overlay"}))
    one = bundle_run_command([base], tmp_path, target="one")
    assert one[one.index("--config_file") + 1] == str(base) and one[-2:] == ["--target", "one"]
    log = tmp_path / "bundle.log"
    run_bundle(one, log, "one config")
    run_bundle(bundle_run_command([base, overlay], tmp_path, target=Path("/x")), log, "two configs")
    text = log.read_text()
    assert "said base to one" in text and "said overlay to /x" in text
