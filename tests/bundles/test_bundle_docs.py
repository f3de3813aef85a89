"""Every bundle's docs/README.md: the commands under "MONAI Bundle Commands" work as written from the
repository root, as far as can be checked without data or trained weights: every config file, meta
file and script they name exists, every ``--id`` override of ``monai.bundle run`` is an id of the
merged configs, every net id exists, every ``python -m`` module is importable; the export command is
run for real. The Performance sections give figures or say what is not yet measured."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READMES = sorted((ROOT / "bundles").glob("*/docs/README.md"))
# arguments of monai.bundle's `run` that are not config ids, and the ids MLflow tracking adds
RUN_ARGS = {"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id", "tracking"}
TRACKING_IDS = {"tracking_uri", "experiment_name", "run_name", "save_execute_config"}


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def commands(text: str) -> list[str]:
    """Shell commands of the fenced code blocks of a markdown text (continuations joined, comments dropped)."""
    cmds = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        cmds += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return cmds


def bundle_commands(readme: Path) -> list[str]:
    cmds = commands(section(readme.read_text(), "MONAI Bundle Commands"))
    assert cmds, f"{readme}: no fenced commands under 'MONAI Bundle Commands'"
    return cmds


def options(words: list[str]) -> dict[str, str]:
    """``--key value`` pairs (a flag followed by another flag gets "")."""
    out, i = {}, 0
    while i < len(words):
        if words[i].startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            out[words[i][2:]] = value
            i += 2 if value else 1
        else:
            i += 1
    return out


def config_files(value: str) -> list[str]:
    return ast.literal_eval(value) if value.startswith("[") else [value]


def check_monai_bundle(cmd: str, words: list[str]) -> None:
    from monai.bundle import ConfigParser

    sub, rest = words[0], words[1:]
    opts = options(rest)
    files = config_files(opts["config_file"]) if "config_file" in opts else []
    for f in files + [opts[k] for k in ("meta_file", "logging_file") if k in opts]:
        assert (ROOT / f).is_file(), f"{cmd}\n  names {f}, which does not exist"
    if sub == "download_large_files":
        assert (ROOT / opts["bundle_path"] / "large_files.yml").is_file(), cmd
        return
    assert files, f"{cmd}\n  no --config_file"
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in files])
    if sub == "run":
        for key in opts:
            if key in RUN_ARGS or key in TRACKING_IDS and opts.get("tracking"):
                continue
            assert key in parser, f"{cmd}\n  --{key} is not an id of {files}"
    elif sub in ("verify_net_in_out", "ckpt_export", "onnx_export", "trt_export"):
        net_id = rest[0] if rest and not rest[0].startswith("--") else opts.get("net_id", "network_def")
        assert net_id in parser, f"{cmd}\n  net id {net_id} not in {files}"
    else:
        pytest.fail(f"{cmd}\n  monai.bundle {sub}: not checked by this test; add it")


def check_command(cmd: str) -> None:
    words = shlex.split(cmd)
    if words[0] == "torchrun":  # torchrun [options] -m monai.bundle ...
        words = ["python"] + words[words.index("-m"):]
    assert words[0] == "python", f"{cmd}\n  unexpected program"
    if words[1] == "-m":
        module = words[2]
        assert importlib.util.find_spec(module) is not None, f"{cmd}\n  no module {module}"
        if module == "monai.bundle":
            check_monai_bundle(cmd, words[3:])
    else:
        assert (ROOT / words[1]).is_file(), f"{cmd}\n  no script {words[1]}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.parent.name)
def test_bundle_commands_name_existing_files_and_ids(readme: Path) -> None:
    for cmd in bundle_commands(readme):
        check_command(cmd)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.parent.name)
def test_the_documented_export_command_works(readme: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zip export is cheap: run the README's line for real (output folder moved to tmp)."""
    from custom_nets.export_bundle import main

    name = readme.parent.parent.name
    lines = [c for c in bundle_commands(readme) if c.startswith("python -m custom_nets.export_bundle bundles/")]
    assert len(lines) == 1, f"{readme}: document the export command once"
    args = shlex.split(lines[0])[3:]
    opts = options(args)
    assert args[0] == f"bundles/{name}" and "out" in opts
    args[args.index("--out") + 1] = str(tmp_path)
    monkeypatch.chdir(ROOT)
    assert main(args) == 0
    zipped = tmp_path / f"{name}_v0.1.0.zip"
    digest, file_name = (tmp_path / f"{name}_v0.1.0.zip.sha256").read_text().split()
    assert file_name == zipped.name and digest == hashlib.sha256(zipped.read_bytes()).hexdigest()


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.parent.name)
def test_performance_gives_figures_or_says_not_yet_measured(readme: Path) -> None:
    perf = section(readme.read_text(), "Performance")
    has_figure = re.search(r"\d+(\.\d+)?\s*(s|min|GB|MB|MiB|%|crops/s)\b|\|\s*\d", perf)
    assert has_figure or "not yet measured" in perf, f"{readme}: Performance has no measured figure"
