"""``python -m dft.train [group=option ...]``: train, merge and evaluate one cell (or a grid with -m).

Hydra composes ``conf/train.yaml`` against the typed schema of :mod:`dft.config`; the run
directory is ``<paths.runs>/<experiment>/<override_dirname>`` so the same overrides always give
the same directory (and a rerun resumes or skips finished work). A multirun without
``experiment=`` gets its own folder named after its overrides (:class:`SweepFolder`), and every
cell's weights are looked up before any starts (:class:`WeightsCheck`).

:func:`cli` is the command line: ``-m`` may stand anywhere, and every failure ends in one line on
stderr (a typo in a group option lists the choices, an unknown key the valid keys, a failed cell
its name and log) with exit status 2, Ctrl-C with 130 (:func:`describe_error`,
:func:`interrupted_message`). ``HYDRA_FULL_ERROR=1`` keeps Hydra's tracebacks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dft import ROOT, DftError
from dft.config import register_configs

log = logging.getLogger("dft")


def cell_name(override_dirname: str) -> str:
    """Directory name of a cell: Hydra's ``override_dirname`` made path-safe (``default`` if empty).

    Slashes become ``_``; names over 200 characters (file systems allow 255 bytes) keep a readable
    180-character prefix and a hash of the whole.
    """
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", override_dirname) or "default"
    if len(name) > 200:
        name = name[:180] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


#: environment variable that carries a multirun's derived sweep name into its cells (in this process,
#: submitit-local children and SLURM jobs, which inherit the submitting environment, requeues included)
SWEEP_ENV = "DFT_SWEEP_NAME"


def default_experiment() -> str:
    """Resolver ``${dft.experiment:}``, the default of ``experiment``: the sweep's derived name in a
    multirun started without ``experiment=`` (:class:`SweepFolder` sets it), else ``default``."""
    return os.environ.get(SWEEP_ENV) or "default"


def sweep_name(overrides: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """Folder name of a multirun without ``experiment=``: its command-line overrides, sorted, as one
    path-safe string (:func:`cell_name`), leaving out the keys the cells' names leave out
    (``hydra.job.config.override_dirname.exclude_keys``: launcher, logger, paths ...).

    ``strategy=dpo,orpo model=smollm2_135m`` -> ``model=smollm2_135m,strategy=dpo,orpo``: the same
    command always gives the same folder (so a resubmitted or requeued sweep finds its cells) and
    two different sweeps never share one. No overrides -> ``default``.
    """
    keep = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in set(exclude))
    return cell_name(",".join(keep))


def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs (``dft.cell``, ``dft.root``, ``dft.experiment``, the launcher's)."""
    if not OmegaConf.has_resolver("dft.cell"):
        OmegaConf.register_new_resolver("dft.cell", cell_name)
    if not OmegaConf.has_resolver("dft.experiment"):
        OmegaConf.register_new_resolver("dft.experiment", default_experiment)
    if not OmegaConf.has_resolver("dft.root"):
        OmegaConf.register_new_resolver("dft.root", lambda: str(ROOT))
    try:
        from dft.launching import register_resolvers as launcher_resolvers
    except ImportError:
        return
    launcher_resolvers()


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _Callback = object  # type: ignore[misc,assignment]


class SweepFolder(_Callback):  # type: ignore[misc,valid-type]
    """``hydra.callbacks.dft_sweep``: a multirun without ``experiment=`` gets its own folder.

    Without it every such grid, the main job and the dry runs shared ``runs/default``. At the start
    of a multirun whose ``experiment`` is still the default interpolation (neither the command line
    nor a ``grid=`` set it), the sweep is named by :func:`sweep_name` and the name is passed to the
    cells through :data:`SWEEP_ENV`; one line says where the sweep goes and how to name it.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        raw = OmegaConf.to_container(config, resolve=False)
        if raw.get("experiment") != "${dft.experiment:}":
            os.environ.pop(SWEEP_ENV, None)
            return
        exclude = OmegaConf.select(config, "hydra.job.config.override_dirname.exclude_keys", default=[]) or []
        name = sweep_name(list(config.hydra.overrides.task), list(exclude))
        os.environ[SWEEP_ENV] = name
        print(f"sweep folder: {Path(str(config.paths.runs)) / name} (named after the overrides; "
              f"experiment=<name> names it yourself)", file=sys.stderr, flush=True)


def sweep_jobs(config: Any) -> List[List[str]]:
    """The override lists of every job of a multirun, as Hydra's basic sweeper expands them
    (the grid's ``hydra.sweeper.params`` first, then the command line's overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class WeightsCheck(_Callback):  # type: ignore[misc,valid-type]
    """``hydra.callbacks.dft_weights``: before a multirun starts any cell, every cell's weights are
    looked up (:func:`dft.plan.missing_weights`, never downloading) and all missing models are
    reported in one line, exit status 2, instead of one failed cell at a time. Dry runs are left
    to :class:`dft.plan.PlanCallback`, which lists them after the plan."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if OmegaConf.select(config, "dry_run", default=False):
            return
        from hydra import compose

        from dft.plan import hub_offline, missing_weights

        jobs = sweep_jobs(config)
        blocked: set = set()
        cells = 0
        for job in jobs:
            missing = missing_weights(compose(config_name="train", overrides=job))
            cells += bool(missing)
            blocked.update(missing)
        if blocked:
            print(f"error: {cells} of the {len(jobs)} cells cannot run on this machine: no weights for "
                  f"{', '.join(sorted(blocked))}"
                  + (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if hub_offline() else "")
                  + "; nothing was started", file=sys.stderr, flush=True)
            sys.exit(2)


register_configs()
register_resolvers()
# (bitsandbytes' warning about its optional CPU kernel is silenced in dft/__init__.py)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra task function: one cell. Returns the cell's objective (for sweepers).

    Every way a cell can end badly ends in one line on stderr: a :class:`dft.DftError` (bad input)
    and any other exception exit with status 2 (the traceback of an unexpected one goes to
    ``<run dir>/traceback.txt``, or a temp file when the run dir was never made), Ctrl-C with 130,
    saying whether the interrupted stage resumes from a checkpoint or restarts from step 0.
    """
    from dft.pipeline import Cell

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    cell = None
    try:
        cell = Cell(cfg, run_dir, run_dir.name)
        t0 = time.monotonic()
        try:
            out = cell.run()
        finally:
            remove_if_unused(run_dir)
        from dft.launching import register_fast_exit

        register_fast_exit()  # a SLURM job's slot is not held through the interpreter's teardown
        if not cfg.dry_run:  # bench/graph_bench.py reads this line (as dft.node's for a node)
            log.info("cell %s finished in %.1f s (its own work, after imports)", run_dir.name, time.monotonic() - t0)
        return out
    except DftError as e:
        log.debug("%s", e)  # printed once, as the one line below
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"error: {interrupted_message(cell, run_dir.name)}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - an unexpected error: one line here, the traceback in a file
        _close_progress_bars()
        where = _save_traceback(run_dir)
        print(f"error: cell {run_dir.name} failed: {type(e).__name__}: {_first_line(e)} (traceback: {where})",
              file=sys.stderr)
        sys.exit(2)


#: what Hydra writes into every job's folder before the task starts (``.hydra/`` and the job's log)
#: what a cell folder holds before the cell did any work: Hydra's own files and dft's cell lock
#: (dft.runs.cell_lock; released by the time this runs)
_HYDRA_FILES = (".hydra", ".cell.lock")


def remove_if_unused(run_dir: Path) -> bool:
    """Remove a cell folder that holds nothing but Hydra's own files (``.hydra/``, ``<job>.log``) and
    the released cell lock (``.cell.lock``).

    Hydra creates the folder before the cell runs; a dry run (its plan goes to ``<sweep>/.plan/``)
    or a cell that failed its checks before writing ``meta.json`` would otherwise leave an empty
    cell behind, which reports and notebooks would count. Returns whether it removed it.
    """
    import shutil

    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return False
    if not entries or any(not (e.name in _HYDRA_FILES or (e.is_file() and e.suffix == ".log")) for e in entries):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()  # the sweep folder too, when this was its only cell
    except OSError:
        pass
    return True


def _close_progress_bars() -> None:
    """Close the tqdm bars an interrupted trainer left open, so they do not print after the error line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar is only decoration
            pass
    sys.stdout.flush()
    sys.stderr.flush()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _save_traceback(run_dir: Path) -> str:
    """Write the current exception's traceback next to the cell (or to a temp file); return its path."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    try:
        if run_dir.is_dir():
            path = run_dir / "traceback.txt"
            path.write_text(text)
            return str(path)
    except OSError:
        pass
    fd, name = tempfile.mkstemp(prefix="dft-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return name


def interrupted_message(cell, name: str) -> str:
    """The one line of a Ctrl-C'd cell: where it stopped and what a rerun of the same command does.

    ``cell.current_stage`` (set by :meth:`dft.pipeline.Cell.train_or_reuse` while a stage trains)
    says which stage was training; its work dir's ``checkpoint-*`` folders say whether a rerun
    resumes it or restarts it from step 0.
    """
    stage = getattr(cell, "current_stage", None) if cell is not None else None
    if not stage:
        return f"interrupted (Ctrl-C) in cell {name}; rerun the same command to continue (finished stages are cached)"
    artefact, work_dir, save_steps = stage
    from dft.stages import last_checkpoint

    ckpt = last_checkpoint(Path(work_dir))
    if ckpt:
        return (f"interrupted (Ctrl-C) in cell {name} while training stage {artefact}; rerun the same command "
                f"to resume it from {Path(ckpt).name}")
    return (f"interrupted (Ctrl-C) in cell {name} while training stage {artefact} before its first checkpoint "
            f"(save_steps={save_steps}): a rerun restarts this stage from step 0")


# ------------------------------------------------------------------------------- the command line
#: Hydra's flags that take no value; its argument parser accepts them only before the overrides
_FLAGS = ("-m", "--multirun")


def normalize_argv(argv: Sequence[str]) -> List[str]:
    """``argv`` with ``-m``/``--multirun`` moved in front of the overrides.

    Hydra's parser reads the overrides as one positional list, so ``dry_run=true -m grid=x`` fails
    with ``unrecognized arguments: grid=x``; the flag's place carries no meaning, so dft accepts it
    anywhere.
    """
    head, rest = list(argv[:1]), list(argv[1:])
    flags = [a for a in rest if a in _FLAGS]
    return head + flags[:1] + [a for a in rest if a not in _FLAGS]


def describe_error(e: BaseException) -> str:
    """One line for an error that ends ``python -m dft.train`` before or around the cells.

    * an unknown group option (``strategy=dpoo``): the group's valid choices;
    * an unknown key: the valid keys of a typed node (no ``+`` hint: ``+`` would add a key that
      the schema does not know and nothing reads), or the ``+`` form for a pass-through dict
      (``strategy.<stage>.trainer``, ``merge.params``), where adding a key is how it is done;
    * a wrong type, an unparsable override: the key and OmegaConf's reason;
    * :class:`dft.launching.CellFailed`: its one-line summary;
    * anything else: its type and first line.
    """
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from dft.launching import CellFailed

    if isinstance(e, DftError):
        return str(e)
    if isinstance(e, CellFailed):
        return e.line
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        choices = ", ".join(e.options or []) or "none"
        return f"{group}={option}: no option {option!r} in config group {group!r}; choose one of: {choices}"
    if isinstance(e, OverrideParseException):
        return f"cannot parse an override: {_first_line(e)} (syntax: https://hydra.cc/docs/1.3/advanced/override_grammar/basic)"
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        import dataclasses

        typ = cause.object_type
        if typ is not None and dataclasses.is_dataclass(typ):
            keys = ", ".join(f.name for f in dataclasses.fields(typ))
            parent = cause.full_key.rpartition(".")[0] or "the top level"
            return f"unknown key {cause.full_key}: {parent} ({typ.__name__}) has only {keys}"
        plus = re.search(r"use (\+\S+)", str(e))
        return (f"unknown key {cause.full_key}: the YAML does not set it; add a new key with "
                f"{plus.group(1) if plus else '+' + cause.full_key + '=<value>'} (a TRL field or mergekit "
                "parameter: their constructors reject misspelt ones)")
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause)}"
    if "Ambiguous value for argument" in str(e):  # Hydra's hint to sweep sits on a later line
        return f"{type(e).__name__}: {_first_line(e)}; to sweep over the values, add -m (--multirun)"
    return f"{type(e).__name__}: {_first_line(e)}"


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m dft.train``: Hydra's command line, with every failure as one line on stderr.

    Errors exit with status 2 (``error: <what>, naming the key, option, file or cell``), Ctrl-C
    with 130. ``HYDRA_FULL_ERROR=1`` keeps Hydra's full tracebacks for debugging.
    """
    sys.argv = normalize_argv(sys.argv if argv is None else argv)
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach this function instead of Hydra's printer
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); rerun the same command to continue (finished stages and cells are "
              "kept)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure ends in one line
        if full:
            raise
        from dft.launching import CellFailed

        if isinstance(e, CellFailed) and e.details:
            print(e.details, file=sys.stderr)
        print(f"error: {describe_error(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
