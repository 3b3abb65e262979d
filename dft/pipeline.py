"""One cell of the grid, top to bottom: data -> stages -> merges -> evaluation -> summary.

:func:`run_cell` is what ``python -m dft.train`` calls for each Hydra job. It reads as the data
path of DESIGN.md §3:

1. check the config and every input (data splits, model weights) before any model loads;
2. write ``config.yaml`` and ``meta.json`` in the cell's run directory;
3. for each stage of the chain: reuse it from the stage cache or train it (TRL; resume from the
   last checkpoint), link it as ``stages/<artefact>``;
4. merge with the partner model if asked (mergekit), after every stage or at the end;
5. evaluate every artefact (cached by artefact and eval config), compute merge synergy;
6. write ``summary.json``, finish the W&B run, print a table, return the objective.

Steps 3-5 are the cell's nodes of the sweep's graph (:func:`dft.graph.cell_steps`: evaluation of
the start model, each stage, each merge, each evaluation, then the summary), built exactly as the
dry-run plan and the graph launcher build them and executed in the graph's topological order by
:meth:`Cell.run_node`, the same method a graph launcher's job (``python -m dft.node``) runs for its
one node. ``Cell.visited`` lists the node ids a run executed, in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dft import DftError
from dft.config import STAGE_SPLIT, validate
from dft.faults import fault_point
from dft.keys import flat_config, uniform_metrics
from dft.runs import (StageCache, canonical_hash, cell_lock, file_digest, link, meta, read_json, remove_stale_tmp,
                      write_json)
from dft.stats import UNCERTAINTY_SUFFIXES, is_uncertainty_key

log = logging.getLogger("dft")

# Every lineage key is defined once, in dft.graph (also used by the dry-run plan and the graph
# launcher); the names below stay importable from here.
from dft.graph import (  # noqa: E402,F401
    EVAL_VERSION,
    MODEL_LINEAGE_KEYS,
    STAGE_PREP_VERSION,
    eval_key,
    evaluates,
    extend_lineage,
    merge_lineage,
    model_identity,
    stage_lineage,
    start_key,
    start_lineage,
)


@dataclass
class Artefact:
    """A model the cell produced or started from, and its evaluation metrics."""

    name: str
    kind: str  # start | stage | merge | partner
    path: Path
    key: str  # cache key (lineage hash)
    stages: list[str] = field(default_factory=list)
    merge: Optional[str] = None
    parents: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"name": self.name, "kind": self.kind, "stages": self.stages, "merge": self.merge,
                "parents": self.parents, "path": str(self.path), "key": self.key, "metrics": self.metrics}


def _container(node: Any) -> Any:
    from dft.config import plain

    return plain(node)


def cell_objective(artefacts: list[Artefact], benchmarks: list[str]) -> Optional[float]:
    """The number a sweeper optimises: mean ``acc_ll`` over benchmarks of the cell's last artefact."""
    if not artefacts or not benchmarks:
        return None
    m = artefacts[-1].metrics
    vals = [m.get(f"{b}/acc_ll") for b in benchmarks if m.get(f"{b}/acc_ll") is not None]
    return sum(vals) / len(vals) if vals else None


class Cell:
    """State of one running cell; see the module docstring for the order of work."""

    def __init__(self, cfg: DictConfig, run_dir: Path, cell: str):
        from dft.modeling import resolve_device

        self.cfg = cfg
        self.run_dir = run_dir
        self.cell = cell
        self.device = resolve_device(cfg.device)
        self.cache = StageCache(cfg.paths.stages)
        self.tracker = None
        self.train_facts: dict[str, dict] = {}
        self.artefacts: list[Artefact] = []
        self._tok = None
        self.current_stage: Optional[tuple] = None  #: (artefact, work dir, save_steps) while a stage trains
        self.merges: list[Artefact] = []  #: merged artefacts (rank 0), for the summary's synergy
        self.visited: list[str] = []  #: graph node ids this process ran, in order (tests/test_graph.py)

    # ------------------------------------------------------------------ checks before work
    def check_inputs(self) -> dict[str, list[dict]]:
        """Load and validate every split the chain needs (fails before any model loads)."""
        from dft.data import load_benchmark, load_split, require_split

        cfg = self.cfg
        rows: dict[str, list[dict]] = {}
        for stage in cfg.strategy.chain:
            split = STAGE_SPLIT[stage]
            require_split(cfg.data, split, stage)
            if split not in rows:
                rows[split] = load_split(cfg.data, split, cfg.model)  # family template rules too
        full = {b: load_benchmark(cfg.data, b) for b in cfg.eval.benchmarks}
        self.benchmark_sizes = {b: len(v) for b, v in full.items()}  # for the power line (eval=full sizes)
        self.benchmarks = {b: v[: cfg.eval.max_items or None] for b, v in full.items()}
        self.heldout = None
        if cfg.eval.perplexity:
            if cfg.data.heldout_text is None:
                raise DftError(f"eval.perplexity is on but domain {cfg.data.name!r} has no data.heldout_text "
                               "(set data.heldout_text=<file> or eval.perplexity=false)")
            self.heldout = [r["text"] for r in load_split(cfg.data, "heldout_text")]
        return rows

    def data_identity(self, split: str) -> dict:
        path = self.cfg.data[split]
        from dft.data import resolve_path

        p = resolve_path(path)
        return {"split": split, "file": Path(p).name, "sha256": file_digest(p)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, art: Artefact) -> dict:
        """Evaluate ``art`` (cached per artefact key and eval config); copy results to ``eval/<name>/``."""
        cfg = self.cfg
        ekey = eval_key(self, art.key)  # dft.graph: one definition for runs, plans and the graph launcher
        if ekey is None:
            return {}
        cache_dir = self.cache.root / "_eval" / ekey
        out_dir = self.run_dir / "eval" / art.name
        done = read_json(cache_dir / "metrics.json")
        if done is None or cfg.force:
            with self.cache.lock(f"_eval-{ekey}"):
                done = None if cfg.force else read_json(cache_dir / "metrics.json")
                if done is None:
                    done = self._evaluate_uncached(art, cache_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in cache_dir.glob("*.json"):
            if f.name != "metrics.json":
                shutil.copyfile(f, out_dir / f.name)
        art.metrics = done
        if self.tracker:  # summary, not history: a later re-evaluation must not log below the run's last step
            self.tracker.summary({f"eval/{art.name}/{k}": v for k, v in done.items()})
            for f in sorted(out_dir.glob("*.json")):
                rec = read_json(f)
                if isinstance(rec, dict) and rec.get("items"):
                    self.tracker.table(f"eval_items/{art.name}/{f.stem}", [
                        {k: it.get(k) for k in ("id", "category", "answer", "pred", "pred_ll", "correct", "correct_ll", "output")}
                        for it in rec["items"]])
            chat = read_json(out_dir / "chat.json")
            if chat:  # open-ended assessment: one row per turn
                self.tracker.table(f"chat/{art.name}", [
                    {"artefact": art.name, "scenario": sc["scenario"], "turn": t["turn"], "user": t["user"],
                     "assistant": t["assistant"]} for sc in chat.get("scenarios", []) for t in sc.get("turns", [])])
        return done

    def eval_precision(self) -> dict:
        """What the numbers' float rounding depends on: the resolved eval dtype and the device type.

        bf16 and fp32 evaluations of one model differ on near-tie items (bench/eval_precision.py),
        so they are cached apart.
        """
        from dft.modeling import resolve_dtype

        name = self.cfg.eval.dtype or self.cfg.model.dtype
        key = "eval.dtype" if self.cfg.eval.dtype else "model.dtype"
        return {"dtype": str(resolve_dtype(name, self.device, key)).removeprefix("torch."), "device": self.device}

    def data_identity_eval(self, bench: str) -> dict:
        from dft.data import resolve_path

        p = resolve_path(self.cfg.data.eval[bench])
        return {"file": Path(p).name, "sha256": file_digest(p)}

    def _evaluate_uncached(self, art: Artefact, cache_dir: Path) -> dict:
        from dft.evaluation.mcq import evaluate_mcq
        from dft.evaluation.perplexity import perplexity
        from dft.modeling import generation_eos_ids, load_model, load_tokenizer

        cfg = self.cfg
        t0 = time.time()
        tok = load_tokenizer(art.path, cfg.model)
        model = load_model(art.path, cfg.model, device=self.device, dtype=self.eval_precision()["dtype"])
        # what the records say is what ran: the loaded weights' dtype (the key's is resolved from the config)
        precision = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": self.device}
        metrics: dict[str, float] = {}
        tmp = cache_dir.with_name(cache_dir.name + f".tmp-{os.getpid()}")
        for old in cache_dir.parent.glob(cache_dir.name + ".tmp-*"):  # killed writers' (we hold the lock)
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
        for bench, items in self.benchmarks.items():
            tok.padding_side = "left"
            rec = evaluate_mcq(model, tok, cfg.model, items, eos_ids=generation_eos_ids(tok, cfg.model),
                               generate=cfg.eval.generate, loglik=cfg.eval.loglik,
                               max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
            rec = {"benchmark": bench, "artefact": art.name, **precision, **rec}
            write_json(tmp / f"{bench}.json", rec)
            metrics[f"{bench}/n"] = rec["n"]
            for k in ("acc", "acc_ll"):
                if rec[k] is not None:  # the point estimate, then its stderr and 95 % Wilson interval
                    metrics[f"{bench}/{k}"] = rec[k]
                    for suffix in UNCERTAINTY_SUFFIXES:
                        metrics[f"{bench}/{k}{suffix}"] = rec[f"{k}{suffix}"]
        if self.heldout is not None:
            from dft.families import doc_end_token

            ppl = perplexity(model, tok, self.heldout, block=cfg.eval.ppl_block, max_tokens=cfg.eval.ppl_max_tokens,
                             end_id=doc_end_token(tok, cfg.model)[1],  # documents end as CPT ends them
                             batch_size=cfg.eval.ppl_batch_size or max(1, cfg.eval.batch_size // 4))
            write_json(tmp / "perplexity.json", {"artefact": art.name, **precision, **ppl})
            metrics["ppl"] = ppl["ppl"]
            for suffix in UNCERTAINTY_SUFFIXES:  # bootstrap over token blocks
                metrics[f"ppl{suffix}"] = ppl[suffix[1:]]
        if cfg.eval.chat:
            from dft.evaluation.chat import run_chat

            chat_cfg = _container(cfg.eval.chat)
            chat = run_chat(model, tok, cfg.model, chat_cfg, tmp, art.name)
            judge_cfg = chat_cfg.get("judge") or {}
            if judge_cfg.get("backend", "none") != "none":
                from dft.evaluation.judge import judge_transcripts

                judge_transcripts(chat, judge_cfg, out_dir=tmp, artefact=art.name)
        write_json(tmp / "metrics.json", metrics)
        fault_point("eval_write")
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(tmp, cache_dir)
        log.info("evaluated %s in %.0f s: %s", art.name, time.time() - t0,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not is_uncertainty_key(k)))
        del model
        return metrics

    # ------------------------------------------------------------------ stages
    def train_or_reuse(self, stage: str, parent: Artefact, rows: list[dict], lineage: dict) -> Artefact:
        """The artefact of ``stage`` on top of ``parent``: from the cache, or trained now."""
        from dft.stages import train_stage

        cfg = self.cfg
        key = canonical_hash(lineage)
        name = f"{parent.name}_{stage}" if parent.kind != "start" else stage
        final = self.cache.entry(key) / "final"
        rank0 = self.dist.is_rank0 if hasattr(self, "dist") else True
        cached = self._from_rank0(self.cache.is_complete(key) and not cfg.force if rank0 else None)
        if cached:
            self.cache.stats["reused"] += 1
            log.info("stage %s: reusing %s", name, self.cache.entry(key))
            facts = self.cache.manifest(key).get("train", {})
            self.train_facts[name] = {**facts, "cached": True}
        else:
            # rank 0 holds the cache lock; the other ranks follow its decisions
            with (self.cache.lock(key) if rank0 else contextlib.nullcontext()):
                cached = self._from_rank0(self.cache.is_complete(key) and not cfg.force if rank0 else None)
                if cached:
                    self.cache.stats["reused"] += 1
                    facts = self.cache.manifest(key).get("train", {})
                    self.train_facts[name] = {**facts, "cached": True}
                    log.info("stage %s: another cell trained it meanwhile; reusing", name)
                else:
                    entry = self.cache.entry(key)
                    attempts = None
                    if rank0:
                        self.cache.prepare(key)
                        write_json(entry / "lineage.json", lineage)
                        attempts = self.cache.attempt(key)
                    self._barrier()
                    sc = cfg.strategy[stage]
                    use = rows[: sc.max_samples] if sc.max_samples else rows
                    log.info("stage %s: training %s on %d rows -> %s", name, stage.upper(), len(use), entry)
                    # what a Ctrl-C names (dft.train.interrupted_message): the stage, its checkpoints
                    self.current_stage = (name, entry / "work", sc.trainer.get("save_steps"))
                    facts = train_stage(kind=stage, stage_cfg=sc, rows=use, start_path=parent.path, model_cfg=cfg.model,
                                        peft_cfg=cfg.peft, work_dir=entry / "work", out_dir=final, device=self.device,
                                        report_to=self.tracker.report_to if self.tracker else "none", seed=cfg.seed,
                                        save=rank0)
                    self.current_stage = None
                    facts["attempts"] = attempts
                    if rank0:
                        self.cache.commit(key, {"lineage": lineage, "train": facts, "artefact": name})
                    self._barrier()
                    self.cache.stats["trained"] += 1
                    self.train_facts[name] = {**facts, "cached": False}
        if rank0:
            link(self.cache.entry(key), self.run_dir / "stages" / name)
        chain = parent.stages + [stage]
        return Artefact(name=name, kind="stage", path=final, key=key, stages=chain)

    def merge(self, art: Artefact, partner: Artefact) -> Artefact:
        """Merge ``art`` with ``partner`` (mergekit, cached by lineage) and link it as ``merged/<name>``."""
        from dft.merging import kinship, merge_models

        cfg = self.cfg
        lineage = merge_lineage(cfg, art.key, partner.key)
        key = canonical_hash(lineage)
        name = f"{art.name}+{cfg.merge.method}"
        final = self.cache.entry(key) / "final"
        with self.cache.lock(key):
            if not self.cache.is_complete(key) or cfg.force:
                entry = self.cache.prepare(key)
                info = merge_models(cfg.merge, art.path, partner.path, final)
                extra = {}
                if cfg.merge.kinship and partner.key != self.start.key:
                    extra["kinship"] = kinship(self.start.path, art.path, partner.path)
                self.cache.commit(key, {"lineage": lineage, "merge": info, **extra, "artefact": name})
                self.cache.stats["trained"] += 1
                write_json(entry / "lineage.json", lineage)
            else:
                self.cache.stats["reused"] += 1
        link(self.cache.entry(key), self.run_dir / "merged" / name)
        man = self.cache.manifest(key) or {}
        merged = Artefact(name=name, kind="merge", path=final, key=key, stages=art.stages, merge=cfg.merge.method,
                          parents=[art.name, partner.name])
        merged.kinship = man.get("kinship")  # type: ignore[attr-defined]
        return merged

    # ------------------------------------------------------------------ the cell
    def run(self) -> Optional[float]:
        """Run the cell; a second process on the same cell waits for the first (``busy=wait``) or
        exits naming it (``busy=exit``): one cell, one runner (:func:`dft.runs.cell_lock`)."""
        from dft.distributed import is_rank0

        cfg = self.cfg
        if cfg.dry_run:  # before the finished-cell skip: a finished cell's plan says what is cached
            self.print_plan()
            return None
        if not is_rank0():  # rank 0 holds the cell's lock for all ranks of a multi-process job
            return self._run()
        with cell_lock(self.run_dir, f"{cfg.experiment}/{self.cell}", wait=cfg.busy == "wait"):
            return self._run()

    def _run(self) -> Optional[float]:
        from dft.modeling import resolve_model_path
        from dft.tracking import Tracker, scrub

        cfg = self.cfg
        summary_path = self.run_dir / "summary.json"
        old = read_json(summary_path)
        if old and old.get("status") == "finished" and not cfg.force:
            log.info("cell %s already finished (%s); force=true recomputes it", self.cell, summary_path)
            print_table(old)
            return old.get("objective")

        validate(cfg)
        for p in remove_stale_tmp(cfg.paths.stages, self.run_dir):
            log.info("removed %s (left by a killed process)", p)
        rows = self.check_inputs()
        from dft.plan import missing_weights

        missing = missing_weights(cfg)  # start and partner at once, not the first one only
        if len(missing) > 1:  # one: resolve_model_path below says exactly what is wrong with it
            raise DftError(f"no weights on this machine for model {cfg.model.name}: {', '.join(missing)}; set model.path / "
                           "model.partner_path to local copies, or allow downloads (unset HF_HUB_OFFLINE)")
        start_path = resolve_model_path(cfg.model, cfg.paths.cache)
        merging = cfg.merge.method != "none"
        partner_path = resolve_model_path(cfg.model, cfg.paths.cache, which="partner") if merging else None

        from dft.distributed import destroy_process_group, init_process_group

        # one process per GPU: every rank trains (DDP); rank 0 alone writes metadata, evaluates,
        # merges, logs to W&B and writes the summary; the others wait at barriers
        self.dist = init_process_group()
        rank0 = self.dist.is_rank0
        resolved = scrub(OmegaConf.to_container(cfg, resolve=True))
        if rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
            write_json(self.run_dir / "meta.json", meta(Path(cfg.paths.root), {
                "experiment": cfg.experiment, "cell": self.cell, "device": self.device,
                "start_model": str(start_path), "partner_model": str(partner_path) if partner_path else None,
                "distributed": {"world_size": self.dist.world_size, "source": self.dist.source,
                                "backend": self._backend()}}))
        tags = [f"model:{cfg.model.name}", f"family:{cfg.model.family}", f"start:{cfg.model.start}",
                f"strategy:{cfg.strategy.name}", f"merge:{cfg.merge.method}", f"peft:{cfg.peft.method}"]
        self.tracker = Tracker(cfg.logger, run_dir=self.run_dir, experiment=cfg.experiment, cell=self.cell,
                               name=f"{cfg.model.name}|{cfg.strategy.name}|{cfg.merge.method}", job_type=cfg.strategy.name,
                               tags=tags, config={**resolved, "cell": flat_config(cfg)}, enabled=rank0,
                               force=bool(cfg.force))
        ok = False
        try:
            if rank0:
                self.print_start(start_path)
            start_id, partner = self.start_artefacts(start_path, partner_path)
            # the cell's nodes of the sweep's graph (dft.graph.cell_steps, as the dry-run plan and the
            # graph launcher build them), executed in the graph's topological order by the same
            # per-node code a graph launcher's job runs (run_node); the summary node is written below
            for step in self.node_steps(start_id, partner):
                if step.node.kind == "summary":
                    self.visited.append(step.node.id)
                    break
                self.run_node(step, rows)
            if merging and not cfg.strategy.chain:
                log.warning("merge.method=%s with strategy=none: nothing was trained, so nothing is merged",
                            cfg.merge.method)
            if not rank0:
                ok = True
                return None
            summary = self.summary(self.merges, partner)
            fault_point("summary")
            write_json(summary_path, summary)
            if self.tracker:
                self.tracker.summary(summary["metrics"])
                if summary["synergy"]:
                    self.tracker.table("synergy", summary["synergy"])
                if summary["comparisons"]:
                    from dft.evaluation.compare import COMPARISON_FIELDS

                    self.tracker.table("comparisons", [{k: c.get(k) for k in COMPARISON_FIELDS}
                                                       for c in summary["comparisons"]])
            print_table(summary)
            ok = True
            return summary["objective"]
        finally:
            if self.tracker:
                self.tracker.finish(exit_code=0 if ok else 1)
            destroy_process_group()

    # ------------------------------------------------------------------ the cell's graph nodes
    def start_artefacts(self, start_path: Path, partner_path: Optional[Path]) -> tuple[dict, Optional[Artefact]]:
        """The start (``self.start``) and partner artefacts and the start's :func:`model_identity`.

        Returns ``(start identity, partner)``: partner None when the cell does not merge, ``self.start``
        itself when the partner's weights are the start's. Appends them to ``self.artefacts``.
        """
        start_id = model_identity(self.cfg.model, start_path)
        self.start = Artefact(name="start", kind="start", path=start_path, key=start_key(start_id))
        self.artefacts.append(self.start)
        self.partner: Optional[Artefact] = None
        if partner_path is not None:
            pid = model_identity(self.cfg.model, partner_path) if partner_path != start_path else start_id
            pkey = start_key(pid)
            if pkey == self.start.key:
                self.partner = self.start
            else:
                self.partner = Artefact(name="partner", kind="partner", path=partner_path, key=pkey)
                self.artefacts.append(self.partner)
        self.produced: dict[str, Artefact] = {"start": self.start}
        if self.partner is not None:
            self.produced["partner"] = self.partner
        return start_id, self.partner

    def node_steps(self, start_id: dict, partner: Optional[Artefact]) -> list:
        """This cell's nodes (:class:`dft.graph.Step`) in the topological order of its graph."""
        from dft.graph import cell_order, cell_steps

        return cell_order(cell_steps(self.cfg, self.cell, start_id, partner.key if partner else None,
                                     self.data_identity, lambda k: eval_key(self, k)))

    def run_node(self, step: Any, rows: dict[str, list[dict]], *, reuse_only: bool = False) -> None:
        """Do one node's work (not ``summary``: :meth:`_run` writes it): the code an in-process cell
        and a graph launcher's job (:func:`dft.node.run_graph_node`) both run.

        Every rank trains a stage; rank 0 alone evaluates and merges; all ranks meet at a barrier
        after each node. The artefact a stage or merge produces is kept in ``self.produced`` (by
        node id) for the nodes that take it. ``reuse_only``: the node must already be complete in
        the cache (a graph job's parents), it is reused, never trained or merged here.

        Raises:
            DftError: ``reuse_only`` and the node is not complete; a node's artefact has another key
                than its node (the graph and the run disagree).
        """
        n = step.node
        rank0 = self.dist.is_rank0 if hasattr(self, "dist") else True
        if reuse_only and n.kind in ("stage", "merge") and \
                not self._from_rank0(self.cache.is_complete(n.key) if rank0 else None):
            raise DftError(f"node {n.id} ({n.name}) of cell {self.cell} is not complete in {self.cache.root}; "
                           "the graph runs a node only after its parents")
        if n.kind in ("eval_start", "eval"):
            if rank0:
                self.evaluate(self.produced[step.of])
        elif n.kind == "stage":
            parent = self.produced[n.parents[0]] if n.parents else self.start
            art = self.train_or_reuse(step.stage, parent, rows[STAGE_SPLIT[step.stage]], step.lineage)
            if rank0 and self.tracker:  # train/<stage>/loss|grad_norm|learning_rate vs train/<stage>/step
                self.tracker.curves(step.stage, self.train_facts.get(art.name, {}).get("log_history"))
            self._same_key(n, art)
            self.produced[n.id] = art
            self.artefacts.append(art)
        elif n.kind == "merge":
            if rank0:
                m = self.merge(self.produced[step.of], self.partner)
                self._same_key(n, m)
                self.produced[n.id] = m
                self.artefacts.append(m)
                self.merges.append(m)
        else:
            raise DftError(f"node {n.id}: kind {n.kind!r} is not run by Cell.run_node")
        self.visited.append(n.id)
        self._barrier()

    def _same_key(self, node: Any, art: Artefact) -> None:
        if art.key != node.key:
            raise DftError(f"node {node.id} ({node.name}) of cell {self.cell}: the run produced key {art.key}; "
                           "the graph and the run disagree")

    # ------------------------------------------------------------------ multi-process helpers
    def _backend(self) -> Optional[str]:
        import torch.distributed as td

        return td.get_backend() if td.is_available() and td.is_initialized() else None

    def _barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            td.barrier()

    def _from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank, so all ranks take the same branch."""
        import torch.distributed as td

        if not (td.is_available() and td.is_initialized()):
            return value
        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def summary(self, merges: list[Artefact], partner: Optional[Artefact]) -> dict:
        """``summary.json`` (docs/CONTRACTS.md): identity, artefacts with metrics (each with its
        stderr and 95 % interval), train facts, paired ``comparisons``
        (:func:`dft.evaluation.compare.cell_comparisons`), synergy with the interval and p of
        merged vs the mean of its parents, flat ``metrics`` (also the W&B summary)."""
        from dft.evaluation.compare import cell_comparisons
        from dft.merging import synergy

        cfg = self.cfg
        metrics = {f"eval/{a.name}/{k}": v for a in self.artefacts for k, v in a.metrics.items()}
        comparisons = cell_comparisons(self.run_dir / "eval", [a.record() for a in self.artefacts],
                                       list(cfg.eval.benchmarks)) if evaluates(cfg) else []
        vs_mean = {(c["a"], c["metric"]): c for c in comparisons if c["kind"] == "merge_vs_mean_of_parents"}
        syn = []
        by_name = {a.name: a for a in self.artefacts}
        for m in merges:
            p1, p2 = by_name[m.parents[0]], partner
            for metric, v in m.metrics.items():
                if metric == "ppl" or is_uncertainty_key(metric) or metric not in p1.metrics or metric not in p2.metrics:
                    continue
                c = vs_mean.get((m.name, metric), {})
                row = {"merged": m.name, "parent_1": p1.name, "parent_2": p2.name, "metric": metric,
                       **synergy(p1.metrics[metric], p2.metrics[metric], v),
                       "ci_low": c.get("ci_low"), "ci_high": c.get("ci_high"), "p": c.get("p")}
                syn.append(row)
                for k in ("expected", "deviation", "improvement", "diversity"):
                    metrics[f"synergy/{m.name}/{metric}/{k}"] = row[k]
        train = {}
        for name, f in self.train_facts.items():
            train[name] = {k: f.get(k) for k in ("train_loss", "runtime_s", "steps", "rows", "rows_dropped_long_prompt",
                                                 "audit", "probe", "trainable_params", "total_params", "cached",
                                                 "log_history", "resumed_from", "attempts")}
        return {
            "experiment": cfg.experiment, "cell": self.cell, "model": cfg.model.name, "family": cfg.model.family,
            "start": cfg.model.start, "strategy": cfg.strategy.name, "chain": list(cfg.strategy.chain),
            "merge": cfg.merge.method, "merge_at": cfg.merge.at, "peft": cfg.peft.method, "data": cfg.data.name,
            "eval": cfg.eval.name, "seed": cfg.seed, "status": "finished",
            # null when the cell evaluates nothing (eval=none)
            "eval_dtype": self.eval_precision()["dtype"] if evaluates(cfg) else None,
            "device": self.device,
            "artefacts": [a.record() for a in self.artefacts],
            "train": train, "synergy": syn, "comparisons": comparisons,
            "kinship": {m.name: getattr(m, "kinship", None) for m in merges if getattr(m, "kinship", None)},
            "metrics": {**metrics, **uniform_metrics([a.record() for a in self.artefacts])},  # + start/ trained/ merged/ final/ delta/
            "objective": cell_objective(self.artefacts, list(cfg.eval.benchmarks)),
            "cache": dict(self.cache.stats),
            "finished_at": time.time(),
            "run_dir": str(self.run_dir),
        }

    # ------------------------------------------------------------------ printing
    def print_start(self, start_path: Path) -> None:
        cfg = self.cfg
        lines = [f"dft cell {cfg.experiment}/{self.cell}: model={cfg.model.name} strategy={cfg.strategy.name} "
                 f"({' -> '.join(cfg.strategy.chain) or 'no training'}) merge={cfg.merge.method} peft={cfg.peft.method} "
                 f"device={self.device}",
                 f"  run dir {self.run_dir}", f"  weights {start_path}"]
        for stage in cfg.strategy.chain:
            t = cfg.strategy[stage].trainer
            bs = t.get("per_device_train_batch_size", 8) * t.get("gradient_accumulation_steps", 1)
            L = t.get("max_length", cfg.model.max_length)
            lines.append(f"  {stage}: effective batch {bs} x {L} tokens, max_steps {t.get('max_steps', -1)}, "
                         f"lr {t.get('learning_rate')}")
        from dft.plan import demo_budget_warning, demo_budgets

        demo = demo_budgets(cfg)
        if demo:
            lines.append("  WARNING: " + demo_budget_warning(demo, cfg.model.name))
        if self.device == "cpu" and cfg.strategy.chain:
            lines.append("  no CUDA device: training runs without bf16 and gradient checkpointing (they fail or run ~13x "
                         "slower on CPU)")
        try:
            # a training-memory estimate, when this run trains: a cell that only evaluates, or whose
            # stages are all cached (a graph launcher's summary job), has none (and skips importing
            # transformers for it)
            if cfg.strategy.chain and not self.stages_cached(start_path):
                from transformers import AutoConfig

                from dft.memory import describe

                lines.append("  " + describe(cfg.model, cfg.peft, _container(cfg.strategy[cfg.strategy.chain[0]].trainer),
                                             AutoConfig.from_pretrained(start_path)))
        except Exception as e:  # noqa: BLE001 - the estimate is informative only
            log.debug("memory estimate unavailable: %s", e)
        from dft.plan import format_power, power_plan

        benchmarks = getattr(self, "benchmarks", None) or {}  # set by check_inputs (absent: nothing evaluated yet)
        pw = format_power(power_plan({b: len(v) for b, v in benchmarks.items()}, getattr(self, "benchmark_sizes", {})))
        if pw:
            lines.append("  " + pw)
        for ln in lines:
            log.info(ln)

    def stages_cached(self, start_path: Path) -> bool:
        """Whether every stage of the chain is complete in the stage cache (``force`` counts as not)."""
        from dft.graph import chain_lineages

        if self.cfg.force:
            return False
        start_id = model_identity(self.cfg.model, start_path)
        return all(self.cache.is_complete(canonical_hash(lin))
                   for _, _, lin in chain_lineages(self.cfg, start_id, self.data_identity))

    def print_plan(self) -> None:
        """``dry_run=true``: check the data, every TRL config and the mergekit config, compute the
        lineage key of every stage, merge and evaluation, say which are cached and estimate the
        GPU-hours (:mod:`dft.plan`); print it and write ``<sweep dir>/.plan/<cell>.json``. Nothing
        trains, no weights load."""
        from dft.plan import dry_run

        dry_run(self)


def format_value(metric: str, m: dict) -> str:
    """``m[metric]`` with its 95 % interval when recorded: ``45.0% [25.8, 65.8]`` (accuracy, in
    %) or ``12.345 [11.9, 12.8]`` (perplexity); empty when absent."""
    v = m.get(metric)
    if v is None:
        return ""
    lo, hi = m.get(f"{metric}_ci_low"), m.get(f"{metric}_ci_high")
    if metric.split("/")[-1] == "ppl":
        return f"{v:.3f}" + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else "")
    return f"{100 * v:.1f}%" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else "")


def print_table(summary: dict) -> None:
    """Print one row per artefact with its metrics (accuracy in %, perplexity), each with its 95 %
    interval, then the paired comparisons with p < 0.05 (before multiplicity
    correction; ``python -m dft.report`` applies Holm over a sweep)."""
    arts = summary.get("artefacts", [])
    keys = sorted({k for a in arts for k in a["metrics"] if not is_uncertainty_key(k)}, key=lambda k: (k == "ppl", k))
    if not keys:
        return
    w = max([len(a["name"]) for a in arts] + [8])
    cols = {k: max([len(k)] + [len(format_value(k, a["metrics"])) for a in arts]) for k in keys}
    head = f"{'artefact':<{w}}  " + "  ".join(f"{k:>{cols[k]}}" for k in keys)
    print("\n" + head + "\n" + "-" * len(head))
    for a in arts:
        print(f"{a['name']:<{w}}  " + "  ".join(f"{format_value(k, a['metrics']):>{cols[k]}}" for k in keys))
    where = f"; evaluated in {summary['eval_dtype']} on {summary.get('device', '?')}" if summary.get("eval_dtype") else ""
    print(f"(acc: greedy answer, exact-match letter; acc_ll: log-likelihood over option letters; ppl: held-out "
          f"perplexity, nats->exp, per token{where}; [95 % interval]: Wilson for accuracies, bootstrap over "
          f"token blocks for ppl)")
    sizes = {k.rsplit("/", 1)[0]: int(v) for a in arts for k, v in a["metrics"].items() if k.endswith("/n") and v}
    if sizes:
        from dft.stats import DEFAULT_DISCORDANCE, min_detectable_difference

        by_n: dict[int, list[str]] = {}
        for b, n in sizes.items():
            by_n.setdefault(n, []).append(b)
        parts = [f"with {n} items ({', '.join(bs)}) accuracy differences under ~{100 * (min_detectable_difference(n) or 1):.0f} "
                 f"points" for n, bs in sorted(by_n.items())]
        print(f"{'; '.join(parts)} are noise (paired test, 80 % power, alpha 0.05, {100 * DEFAULT_DISCORDANCE:.0f} % of "
              f"items assumed discordant)")
    comps = summary.get("comparisons") or []
    if comps:
        sig = [c for c in comps if c.get("p") is not None and c["p"] < 0.05]
        print(f"paired comparisons: {len(comps)}, {len(sig)} with p < 0.05 before correcting for multiplicity"
              + (":" if sig else ""))
        for c in sig:
            from dft.stats import format_p

            scale, unit, nd = (1, "", 3) if c["metric"] == "ppl" else (100, " points", 1)
            print(f"  {c['a']} vs {c['b']} on {c['metric']}: {scale * c['diff']:+.{nd}f}{unit} "
                  f"[{scale * c['ci_low']:.{nd}f}, {scale * c['ci_high']:.{nd}f}], {format_p(c['p'])} ({c['test']})")
    print(f"summary: {Path(summary.get('run_dir', '.')) / 'summary.json'}\n")


def run_cell(cfg: DictConfig, run_dir: Path, cell: str) -> Optional[float]:
    """Run one cell (see :class:`Cell`); a :class:`dft.DftError` propagates for a one-line message."""
    return Cell(cfg, run_dir, cell).run()

