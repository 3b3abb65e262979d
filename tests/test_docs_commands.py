"""Every command the docs show works as written.

The commands are extracted from README.md, launch/README.md, bench/README.md (fenced blocks and
inline code that starts with a program) and from the comments of conf/ (``# python -m dft...``).
Each one is handled by exactly one rule below, and a command no rule knows fails the test, so a
new command in the docs must be taught here:

* run exactly as written, in a subprocess: ``python -m dft.train --help``, the README's plan
  command (a dry run of ``grid=paper_all``: no weights, no GPU) and ``python -m dft.plan`` on it,
  ``python -m dft.report`` on a fixture sweep;
* parsed by the program's own argument parser and composed with Hydra (``dft.train`` overrides,
  the sweep's first value per swept key, then :func:`dft.config.validate`), where running needs a
  GPU, weights, SLURM or minutes of CPU; ``dft.data build`` against its own config; the bench
  scripts and ``dft.data.prepare`` through their argparse parsers;
* scripts of this repository: they exist and ``bash -n`` accepts them, and a subcommand the docs
  name is one the script handles;
* tools that are not ours (SLURM's CLI, du, apt-get, pip, wandb's own CLI): listed, not run.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CACHE, ROOT, compose

DOCS = ("README.md", "launch/README.md", "bench/README.md")
NOTEBOOKS = ("notebooks/explore_sweep.ipynb", "notebooks/compare_sweeps.ipynb")
PROGRAMS = ("python", ".venv/bin/python", ".venv/bin/pip", "./bootstrap.sh", "sudo", "launch/", "wandb", "squeue",
            "sacct", "scancel", "nohup", "tmux", "du", "apt-get", "/usr/bin/time", "rm", "bash", "srun", "sbatch",
            ".venv/bin/jupyter", "papermill")
ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+")
#: tools that are not dft's: the docs name them, the test does not run them
EXTERNAL = ("squeue", "sacct", "scancel", "sbatch", "srun", "du", "apt-get", "rm", ".venv/bin/pip", "wandb",
            "/usr/bin/time")
#: placeholders of the docs and what stands for them here
PLACEHOLDERS = {"<gpu>": "gpu", "<fresh>": "/tmp/fresh", "<hash>": "0123abcd", "<cached 135M>": "/tmp/model",
                "<folder>": "papers/", "<domain>": "silk", "<sweep>": "", "source=...": "source=papers/",
                "name=...": "name=silk"}


def _is_command(text: str) -> bool:
    rest = ENV.sub("", text.strip())
    return len(rest.split()) > 1 and not rest.split()[0].endswith("/") and any(
        rest == p or rest.startswith(p + " ") or (p.endswith("/") and rest.startswith(p) and " " in rest)
        for p in PROGRAMS)


def doc_commands(rel: str) -> list[str]:
    """Commands of one Markdown file (or a notebook's Markdown cells): fenced-block lines (``\\``
    continuations joined), inline code."""
    out, prose, fenced, buf = [], [], False, ""
    if rel.endswith(".ipynb"):
        import json

        cells = json.loads((ROOT / rel).read_text())["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    else:
        text = (ROOT / rel).read_text()
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose.append(line)
            continue
        s = (buf + " " + line.strip()) if buf else line.rstrip()
        buf = ""
        if s.endswith("\\"):
            buf = s[:-1].rstrip()
            continue
        if _is_command(s):
            out.append(s.strip())
    for span in re.findall(r"`([^`]+)`", "\n".join(prose).replace("\n", " ")):
        if _is_command(span):
            out.append(span.strip())
    return out


def conf_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every ``python -m dft...`` in a comment of conf/**.yaml (prose after it cut)."""
    out = []
    for f in sorted((ROOT / "conf").rglob("*.yaml")):
        for line in f.read_text().splitlines():
            m = re.search(r"#.*?(python -m dft\.[a-z_.]+.*)$", line)
            if not m:
                continue
            words = []
            for w in shlex.split(m.group(1).split("`")[0].split("  #")[0], posix=False):
                if words[2:] and not re.match(r"^(-|['\"]|[\w.+~/<>-]+=|runs/|build$)", w):
                    break  # prose after the command ("then", "(conf/grid/)", "[key=value ...]")
                words.append(w if w.endswith("...") else w.rstrip(",.;:"))
            out.append((str(f.relative_to(ROOT)), " ".join(words)))
    return out


def all_commands() -> list[tuple[str, str]]:
    return [(d, c) for d in DOCS + NOTEBOOKS for c in doc_commands(d)] + conf_commands()


def words_of(command: str) -> list[str]:
    """The command's words: comment, env assignments, nohup/tmux wrappers, redirections and ``…`` removed."""
    command = command.split("  #")[0].strip()
    for k, v in PLACEHOLDERS.items():
        command = command.replace(k, v)
    if command.startswith("tmux "):
        command = shlex.split(command)[-1]
    command = ENV.sub("", command)
    w = [x for x in shlex.split(command) if x not in ("…", "...", "&")]
    if w and w[0] == "nohup":
        w = w[1:]
    if ">" in w:
        w = w[: w.index(">")]
    if w and w[0] in ("python", ".venv/bin/python"):
        w[0] = "python"
    return w


# ------------------------------------------------------------------------------- rules
def _hydra_parse(argv: list[str]) -> argparse.Namespace:
    """Hydra's own parser on the argv ``python -m dft.train`` hands it (flags normalised by dft.train)."""
    from hydra._internal.utils import get_args_parser

    from dft.train import normalize_argv

    parser = get_args_parser()
    parser.exit_on_error = False

    def fail(message):  # argparse calls error() for unrecognized arguments even without exit_on_error
        raise AssertionError(message)

    parser.error = fail  # type: ignore[method-assign]
    return parser.parse_args(normalize_argv(["dft.train", *argv])[1:])


def compose_train(overrides: list[str]) -> None:
    """Compose like the first job of the (multi)run: each swept key's first value, grid sweeps too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dft.config import validate

    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [o.get_key_element() + "=" + (next(iter(o.sweep_string_iterator())) if o.is_sweep_override()
                                            else o.get_value_element_as_str()) for o in parsed]
    from omegaconf import OmegaConf

    params = OmegaConf.select(compose_hydra(first), "hydra.sweeper.params") or {}  # a grid's own sweep
    given = {o.split("=", 1)[0] for o in first}
    validate(compose(first + [f"{k}={str(v).split(',')[0]}" for k, v in params.items() if k not in given]))


def compose_hydra(overrides: list[str]):
    import dft.train  # noqa: F401
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)


class _Parsed(Exception):
    pass


def argparse_only(script: str | None, module: str | None, args: list[str]) -> argparse.Namespace:
    """Run a script's ``main`` up to its ``parse_args`` (which raises with the namespace), nothing after."""
    seen: list[argparse.Namespace] = []
    orig = argparse.ArgumentParser.parse_args

    def parse(self, a=None, ns=None):
        seen.append(orig(self, a, ns))
        raise _Parsed

    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script or module, *args]
    sys.path.insert(0, str(ROOT))
    argparse.ArgumentParser.parse_args = parse  # type: ignore[method-assign]
    try:
        if script:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = orig  # type: ignore[method-assign]
        sys.argv, sys.path[:] = old_argv, old_path
    assert seen, f"{script or module} never parsed its arguments"
    return seen[0]


def classify(words: list[str]) -> str:
    """Which rule handles a command (see the module docstring)."""
    w = words[1:] if words[:1] == ["sudo"] else words
    if w[:3] == ["python", "-m", "dft.train"]:
        return "train"
    if w[:3] == ["python", "-m", "dft.report"]:
        return "report"
    if w[:3] == ["python", "-m", "dft.plan"]:
        return "plan"
    if w[:4] == ["python", "-m", "dft.data", "build"]:
        return "build"
    if w[:3] == ["python", "-m", "dft.data.prepare"]:
        return "prepare"
    if w[:3] in (["python", "-m", "dft.sync"], ["python", "-m", "dft.node"]):
        return "cli"  # argparse programs that need a finished sweep / a submitted graph: parsed only
    if w[:1] == ["python"] and w[1:2] and w[1].startswith("tests/"):
        return "test_script"  # a test module run as a script (its __main__ prints the README's figure)
    if w[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if w[:1] == ["python"] and w[1:2] and w[1].startswith("bench/"):
        return "bench"
    if w[:2] == [".venv/bin/jupyter", "execute"]:
        return "notebook"
    if w[0] == "papermill":
        return "external"  # an alternative the notebooks name; dft does not install it
    if w[:3] == ["python", "-m", "submitit.core._submit"]:
        return "external"  # what each SLURM job runs, written by submitit
    if w[0].startswith(("launch/", "./")) or w[0] == "bash":
        return "script"
    if w[0] in EXTERNAL:
        return "external"
    return "unknown"


def test_every_documented_command_is_known_to_a_rule():
    cmds = all_commands()
    assert len(cmds) > 60, "the extraction found too few commands"
    unknown = [(f, c) for f, c in cmds if classify(words_of(c.split("&&")[-1])) == "unknown"]
    assert not unknown, unknown


def _train_commands() -> list[tuple[str, str]]:
    out = []
    for f, c in all_commands():
        for part in c.split("&&"):
            w = words_of(part)
            if classify(w) == "train":
                out.append((f, " ".join(w)))
    return sorted(set(out))


@pytest.mark.parametrize("where,command", _train_commands())
def test_train_command_parses_and_composes(where, command):
    """Every ``python -m dft.train`` of the docs: Hydra's parser accepts its argv (the README's
    ``dry_run=true -m grid=paper_all`` did not) and its overrides compose and validate."""
    words = shlex.split(command)[3:]
    if any(o.startswith("data=") and o.split("=", 1)[1] in ("silk", "<name>") for o in words):
        pytest.skip("data=silk is the YAML `dft.data build` writes: tests/test_databuild.py runs that path")
    ns = _hydra_parse(words)
    if ns.help:
        return
    compose_train(list(ns.overrides))


@pytest.mark.slow
def test_readme_plan_command_runs_as_written(tmp_path):
    """The README's plan command, exactly: a dry run of the 48-cell paper_all grid, then ``dft.plan``.

    Slow: 30 s on a quiet 2-core machine, 107 s on a loaded one (48 cells each load and hash the
    materials data and build their TRL configs). The fast tests above parse the same argv with
    Hydra's parser and compose it, which is where the README's form used to fail."""
    cmd = next(c for f, c in all_commands() if f == "README.md" and "dry_run=true" in c and "paper_all" in c)
    words = words_of(cmd)
    assert words[:3] == ["python", "-m", "dft.train"]
    env = dict(os.environ, DFT_RUNS=str(tmp_path), DFT_CACHE=str(CACHE))
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))  # as on a fresh clone: no 7-8B weights here
    p = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "dry-run plan of" in p.stdout and ": 48 cells" in p.stdout, p.stderr[-3000:]
    # the whole plan is printed, then one line says that its cells cannot run here (item 8 of issue 22)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "error: 48 of 48 cell(s) cannot run on this machine: no weights for HuggingFaceTB/SmolLM-1.7B, "
        "HuggingFaceTB/SmolLM-1.7B-Instruct, meta-llama/Llama-3.1-8B, meta-llama/Llama-3.1-8B-Instruct, "
        "mistralai/Mistral-7B-Instruct-v0.3, mistralai/Mistral-7B-v0.3 (HF_HUB_OFFLINE=1: nothing is downloaded)")
    sweep = tmp_path / "paper_all"
    assert len([x for x in (sweep / ".plan").glob("*.json") if x.name != "_grid.json"]) == 48
    q = subprocess.run([sys.executable, "-m", "dft.plan", str(sweep)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert q.returncode == 2 and ": 48 cells" in q.stdout, q.stderr[-2000:]
    assert q.stderr.strip().startswith("error: cells of this plan cannot run where it was made: no weights for ")


def test_train_help_runs_as_written():
    p = subprocess.run([sys.executable, "-m", "dft.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for group in ("model", "strategy", "merge", "grid", "launcher"):
        assert f"{group}:" in p.stdout


def test_report_commands_name_their_grids_sweep(tmp_path):
    """``python -m dft.report runs/<x>`` in a grid's comments names the grid's own ``experiment``,
    and the report runs as written on a (synthetic) sweep of that name."""
    import importlib.util

    for f, c in all_commands():
        w = words_of(c)
        if classify(w) == "report" and f.startswith("conf/grid/"):
            grid = Path(f).stem
            cfg = compose([f"grid={grid}"])
            assert w[3] == f"runs/{cfg.experiment}", (f, c)
    spec = importlib.util.spec_from_file_location("sweep_builder", ROOT / "tests" / "fixtures" / "sweep_builder.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    sb.write_sweep(tmp_path / "runs", "paper_demo")
    cmd = next(words_of(c) for f, c in all_commands() if f == "conf/grid/paper_demo.yaml" and "dft.report" in c)
    p = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = tmp_path / "runs" / "paper_demo" / "report" / "report.md"
    assert p.stdout.strip().splitlines()[-1] == "runs/paper_demo/report/report.md" and report.is_file(), p.stdout
    assert report.read_text().startswith("# dft sweep report")


def _commands_of(kind: str) -> list[tuple[str, list[str]]]:
    out = []
    for f, c in all_commands():
        for part in c.split("&&"):
            w = words_of(part)
            if classify(w) == kind:
                out.append((f, w))
    return out


def test_build_commands_compose():
    """``python -m dft.data build ...``: its Hydra config composes with the documented overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import dft.databuild.cli  # noqa: F401  registers the schema

    cmds = _commands_of("build")
    assert len(cmds) >= 3
    for f, w in cmds:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf" / "databuild"), version_base="1.3"):
            cfg = hydra_compose(config_name="build", overrides=w[4:])
        assert cfg.name == "silk", (f, w)


def test_bench_and_prepare_commands_parse():
    """The bench scripts and ``dft.data.prepare``: their own parsers accept the documented flags."""
    cmds = _commands_of("bench") + _commands_of("prepare") + _commands_of("cli")
    assert len(cmds) >= 15
    for f, w in cmds:
        if w[1] == "-m":
            argparse_only(None, w[2], w[3:])
        else:
            argparse_only(w[1], None, w[2:])


def test_pytest_commands_name_real_tests_and_markers():
    import tomllib

    markers = {m.split(":")[0] for m in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
               ["ini_options"]["markers"]}
    for f, w in _commands_of("pytest"):
        args = w[3:]
        for i, a in enumerate(args):
            if a == "-m":
                assert set(re.findall(r"\w+", args[i + 1])) - {"not", "and", "or"} <= markers, (f, w)
            elif not a.startswith("-") and (i == 0 or args[i - 1] != "-m"):
                assert (ROOT / a.split("::")[0]).exists(), (f, w)


def test_test_scripts_exist_and_run_as_main():
    cmds = _commands_of("test_script")
    assert cmds, "README names no test module run as a script"
    for f, w in cmds:
        path = ROOT / w[1]
        assert path.is_file() and 'if __name__ == "__main__":' in path.read_text(), (f, w)


def test_repository_scripts_exist_and_parse():
    for f, w in _commands_of("script"):
        w = w[1:] if w[0] == "sudo" else w
        path = ROOT / w[0]
        assert path.is_file(), (f, w)
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, (f, w)
        if len(w) > 1 and not w[1].startswith("-"):
            text = path.read_text()
            for sub in w[1].split("|"):
                assert re.search(rf"^\s*{re.escape(sub)}\)|[|(]\s*{re.escape(sub)}\s*[|)]", text, re.M), (f, sub)


def test_notebook_commands_use_what_the_test_extra_installs():
    """``jupyter execute`` comes with nbclient (the test extra); the notebook named must exist
    (tests/test_notebooks.py executes each one on a fixture sweep)."""
    cmds = _commands_of("notebook")
    assert len(cmds) >= 2
    exe = Path(sys.executable).parent / "jupyter-execute"
    assert exe.exists(), f"{exe} missing: nbclient provides it"
    for f, w in cmds:
        assert (ROOT / w[2]).is_file(), (f, w)
