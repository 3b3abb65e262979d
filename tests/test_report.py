"""dft.analysis and ``python -m dft.report`` on SYNTHETIC sweeps (tests/fixtures/sweep_builder.py).

The fixture writes summary.json / eval JSON in the exact docs/CONTRACTS.md formats with made-up
numbers; every expected value below is read back from those files independently of dft.analysis.
``test_real_tiny_sweep_with_two_seeds`` (``-m slow``) runs a real two-seed tiny-model sweep instead.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from dft import DftError
from dft import analysis as A
from dft import report as R

_spec = importlib.util.spec_from_file_location(
    "sweep_builder", Path(__file__).parent / "fixtures" / "sweep_builder.py")
sweep_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_builder)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACC = "matsci_mcq/acc"


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = sweep_builder.write_sweep(root, "grid", judge=True, unfinished=True)
    b = sweep_builder.write_sweep(root, "grid_v2", seed=1, shift=0.05)
    return a, b


@pytest.fixture(scope="module")
def report(sweeps, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = R.build_report([sweeps[0]], out, progress=False)
    return path, path.read_text()


def _summaries(sweep):
    return {s["cell"]: s for s in sweep_builder.read_summaries(sweep)}


def _section(text: str, heading: str) -> str:
    """The Markdown from ``heading`` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == heading)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ")[0]) <= len(level)), len(lines))
    return "\n".join(lines[start:end])


# ------------------------------------------------------------------------------------ analysis
def test_load_sweep_one_row_per_cell_and_artefact(sweeps):
    sums = _summaries(sweeps[0])
    df = A.load_sweep(sweeps[0])
    assert len(df) == sum(len(s["artefacts"]) for s in sums.values())
    assert set(df["cell"]) == set(sums)  # the unfinished cell (no summary.json) is skipped
    for col in ["experiment", "cell", "model", "family", "start", "strategy", "chain", "merge",
                "artefact", "kind", ACC, "matsci_mcq/acc_ll", "ppl"]:
        assert col in df.columns
    for r in df.itertuples(index=False):
        s = sums[r.cell]
        art = next(a for a in s["artefacts"] if a["name"] == r.artefact)
        assert getattr(r, "ppl") == art["metrics"]["ppl"]
        assert r.chain == "_".join(s["chain"]) and r.kind == art["kind"]
    assert A.metric_columns(df) == [ACC, "matsci_mcq/acc_ll", "ppl"]
    both = A.load_sweep(list(sweeps))
    assert set(both["sweep"]) == {"grid", "grid_v2"}


def test_load_sweep_errors(tmp_path):
    with pytest.raises(DftError, match="not found"):
        A.load_sweep(tmp_path / "nope")
    (tmp_path / "empty" / "cell").mkdir(parents=True)
    with pytest.raises(DftError, match="no summary.json"):
        A.load_sweep(tmp_path / "empty")


def test_relative_to_baseline(sweeps):
    sums = _summaries(sweeps[0])
    df = A.relative_to_baseline(A.load_sweep(sweeps[0]), ACC)
    # smollm2 has an instruct model: every smollm2 row is relative to its `start` artefact
    inst = next(s for s in sums.values() if s["model"] == "smollm2_135m_instruct")
    b = next(a for a in inst["artefacts"] if a["name"] == "start")["metrics"][ACC]
    sm = df[df["family"] == "smollm2"]
    assert (sm[f"{ACC}:baseline"] == b).all()
    row = sm[(sm["model"] == "smollm2_135m") & (sm["artefact"] == "cpt_sft_orpo+slerp")].iloc[0]
    assert row[f"{ACC}:relative"] == pytest.approx((row[ACC] - b) / b)
    # mistral has only a base model: each cell's own start is its baseline
    for r in df[df["family"] == "mistral"].to_dict("records"):
        own = next(a for a in sums[r["cell"]]["artefacts"] if a["name"] == "start")["metrics"][ACC]
        assert r["baseline_of"] == "own start" and r[f"{ACC}:baseline"] == own
    # perplexity: lower is better, so a lower ppl is a positive improvement
    p = A.relative_to_baseline(A.load_sweep(sweeps[0]), "ppl")
    better = p["ppl"] < p["ppl:baseline"]
    assert (p.loc[better, "ppl:relative"] > 0).all() and better.any()
    with pytest.raises(DftError, match="no metric"):
        A.relative_to_baseline(df, "nope/acc")


def test_rankings_and_unique_artefacts(sweeps):
    df = A.load_sweep(sweeps[0])
    u = A.unique_artefacts(df)
    # each model's start appears once, however many cells start from it
    assert (u[u["kind"] == "start"].groupby("model").size() == 1).all()
    r = A.rankings(df, ACC, by="family")
    for _, g in r.groupby("family"):
        assert g[ACC].is_monotonic_decreasing and g["rank"].iloc[0] == 1
    rp = A.rankings(df, "ppl", top=3)
    assert rp["ppl"].is_monotonic_increasing and rp["rank"].max() <= 3
    assert rp["ppl"].iloc[0] == df["ppl"].min()


def test_synergy_table_matches_summaries(sweeps):
    sums = _summaries(sweeps[0])
    syn = A.synergy_table(A.load_sweep(sweeps[0]))
    assert len(syn) == sum(len(s["synergy"]) for s in sums.values()) > 0
    assert len(A.synergy_table(sweeps[0])) == len(syn)  # from a folder too
    assert len(A.synergy_table(list(sums.values()))) == len(syn)  # and from dicts
    for r in syn.to_dict("records"):
        rec = next(x for x in sums[r["cell"]]["synergy"] if x["merged"] == r["merged"] and x["metric"] == r["metric"])
        for k in ("p1", "p2", "expected", "merged_score", "deviation", "improvement", "diversity"):
            assert r[k] == rec[k]
        kin = sums[r["cell"]]["kinship"].get(r["merged"])
        if kin:  # recorded only when the partner differs from the start model
            assert r["kinship_cosine"] == kin["cosine"]
    assert syn["kinship_cosine"].notna().any()


def test_train_histories_and_judge(sweeps):
    df = A.load_sweep(sweeps[0])
    h = A.train_histories(df)
    assert set(h["stage"]) == {"cpt", "sft", "dpo", "orpo"}
    # a cached stage is one curve, not one per cell reusing it
    assert h[(h["model"] == "smollm2_135m") & (h["artefact"] == "cpt")]["step"].is_unique
    j = A.judge_table(df)
    assert not j.empty and j["normalised"].max() == 1.0
    assert (j["total"] <= j["max_total"]).all() and j["chat_path"].map(lambda p: Path(p).is_file()).all()
    for r in j.to_dict("records"):  # the judge's own summary (mean per criterion, summed)
        doc = json.loads(Path(r["judge_path"]).read_text())
        assert r["total"] == pytest.approx(doc["summary"]["total"]) and r["n_scored"] == doc["summary"]["n_scored"]
        assert r["judge/clarity"] == pytest.approx(doc["summary"]["clarity"])
    assert A.judge_table(A.load_sweep(sweeps[1])).empty


def test_final_artefacts(sweeps, tmp_path):
    df = A.load_sweep(sweeps[0])
    fin = A.final_artefacts(df)
    assert len(fin) == df["cell"].nunique() and fin["cell"].is_unique
    for r in fin.to_dict("records"):
        assert r["artefact"] == (r["chain"] + "+slerp" if r["merge"] == "slerp" else r["chain"])
    each = A.load_sweep(sweep_builder.write_sweep(tmp_path, "each", merge_at="each"))
    assert (each["kind"] == "merge").sum() > (df["kind"] == "merge").sum()  # a merge after every stage
    fin = A.final_artefacts(each)
    assert fin["cell"].is_unique and set(fin.loc[fin["merge"] == "slerp", "artefact"]) == {
        "cpt_sft+slerp", "cpt_sft_dpo+slerp", "cpt_sft_orpo+slerp"}


def test_compare_sweeps(sweeps):
    df = A.load_sweep(list(sweeps))
    c = A.compare_sweeps(df, ACC)
    assert list(c.columns[:3]) == ["grid", "grid_v2", "delta"]
    assert (c["delta"] == c["grid_v2"] - c["grid"]).all()
    with pytest.raises(DftError):
        A.compare_sweeps(A.load_sweep(sweeps[0]), ACC)


def test_load_wandb_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(DftError, match="load_sweep"):
        A.load_wandb("dft")


def test_load_wandb_with_a_fake_api(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # tests run offline; this one reads a fake API
    class Run:  # what dft.tracking logs: the resolved Hydra config, flat eval/* summary keys
        group, job_type, name, state = "grid", "cpt_sft", "m|cpt_sft|none", "finished"
        config = {"experiment": "grid", "model": {"name": "m", "family": "f", "start": "instruct"},
                  "strategy": {"name": "cpt_sft", "chain": ["cpt", "sft"]}, "merge": {"method": "none"},
                  "peft": {"method": "lora"}, "data": {"name": "materials"}, "seed": 0}
        summary = {"eval/start/mcq/acc": 0.5, "eval/cpt_sft/mcq/acc": 0.6, "eval/cpt_sft/ppl": 9.0,
                   "synergy/x/mcq/acc/deviation": 0.1, "train/loss": 1.0}

    class Api:
        def runs(self, path, filters):
            assert path == "team/dft" and filters == {"group": "grid"}
            return [Run()]

    df = A.load_wandb("dft", "team", {"group": "grid"}, api=Api())
    assert len(df) == 2
    row = df.set_index("artefact").loc["cpt_sft"]
    assert row["ppl"] == 9.0 and row["mcq/acc"] == 0.6 and row["kind"] == "stage"
    assert (row["model"], row["family"], row["chain"], row["merge"], row["data"]) == ("m", "f", "cpt_sft", "none", "materials")
    assert A.relative_to_baseline(df, "mcq/acc").set_index("artefact").loc["cpt_sft", "mcq/acc:relative"] == pytest.approx(0.2)


# -------------------------------------------------------------------------------------- report
def test_report_figures_are_valid_pngs(report):
    import matplotlib.image as mpimg

    path, text = report
    figs = [l.split("](")[1].rstrip(")") for l in text.splitlines() if l.startswith("![")]
    names = {Path(f).name.split("_")[0] for f in figs}
    assert {"relative", "heatmap", "synergy.png", "training"} <= names
    for f in figs:
        p = path.parent / f
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and p.stat().st_size > 0
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_report_results_table_equals_summaries(report, sweeps):
    sums = _summaries(sweeps[0])
    _, text = report
    tab = R.parse_markdown_tables(_section(text, "## Results per artefact"))[0]
    assert len(tab) == len(A.unique_artefacts(A.load_sweep(sweeps[0])))
    for r in tab.to_dict("records"):
        art = next(a for a in sums[r["cell"]]["artefacts"] if a["name"] == r["artefact"])
        assert r["model"] == sums[r["cell"]]["model"] and r["kind"] == art["kind"]
        m = art["metrics"]
        for metric, value in m.items():
            if metric.endswith(("_stderr", "_ci_low", "_ci_high", "/n")):
                assert metric not in r  # shown inside the metric's cell, not as columns
                continue
            # `metric [95 % CI]`, the interval as summary.json records it
            expected = f"{value:.4f} [{m[metric + '_ci_low']:.4f}, {m[metric + '_ci_high']:.4f}]"
            assert r[metric] == expected, (r["cell"], r["artefact"], metric)


def test_report_synergy_and_training_tables_equal_summaries(report, sweeps):
    sums = _summaries(sweeps[0])
    _, text = report
    (syn,) = R.parse_markdown_tables(_section(text, "## Synergy of merges (expected vs actual)"))
    assert len(syn) == sum(len(s["synergy"]) for s in sums.values())
    for r in syn.to_dict("records"):
        rec = next(x for x in sums[r["cell"]]["synergy"] if x["merged"] == r["merged"] and x["metric"] == r["metric"])
        for k in ("p1", "p2", "expected", "merged_score", "deviation"):
            assert r[k] == f"{rec[k]:.4f}"
    (train,) = R.parse_markdown_tables(_section(text, "## Training"))
    assert len(train) == len({(s["model"], a) for s in sums.values() for a in s["train"]})
    for r in train.to_dict("records"):
        t = sums[r["cell"]]["train"][r["artefact"]]
        assert r["train/train_loss"] == f"{t['train_loss']:.4f}"
        assert r["train/steps"] == str(t["steps"]) and r["train/runtime_s"] == f"{t['runtime_s']:.4f}"
        assert r["train/cached"] == ("yes" if t["cached"] else "no")


def test_report_relative_table_and_judge_links(report, sweeps):
    path, text = report
    (rel,) = R.parse_markdown_tables(_section(text, "### Relative to the baseline"))
    start = rel[(rel["model"] == "smollm2_135m_instruct") & (rel["artefact"] == "start")].iloc[0]
    assert start[f"{ACC} vs baseline (+ = higher)"] == "+0.0 %"
    # perplexity's column says its sign: positive where the artefact's ppl is below the baseline's
    ppl_cols = [c for c in rel.columns if c.startswith("ppl") and c.endswith("vs baseline (+ = lower)")]
    assert ppl_cols, list(rel.columns)
    res = R.parse_markdown_tables(_section(text, "## Results per artefact"))[0]
    base_ppl = float(res[(res["model"] == "smollm2_135m_instruct") & (res["artefact"] == "start")].iloc[0]["ppl"].split()[0])
    checked = 0
    for r, q in zip(rel.to_dict("records"), res.to_dict("records")):
        if r["model"] == "smollm2_135m_instruct" and r[ppl_cols[0]] not in ("", "-", "nan") and r["artefact"] != "start":
            pct = float(r[ppl_cols[0]].rstrip(" %"))
            assert (pct > 0) == (float(q["ppl"].split()[0]) < base_ppl) or abs(pct) < 0.05, (r, q)
            checked += 1
    assert checked >= 1
    (judge,) = R.parse_markdown_tables(_section(text, "## Open-ended assessment (judge)"))
    assert len(judge) == len(A.judge_table(A.load_sweep(sweeps[0])))
    for link in judge["chat"]:
        target = link.split("](")[1].rstrip(")")
        assert (path.parent / target).resolve().is_file()


def test_cli_two_sweeps_and_errors(sweeps, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert R.main([str(sweeps[0]), str(sweeps[1]), "--out", str(out), "--no-progress",
                   "--metrics", ACC]) == 0
    text = (out / "report.md").read_text()
    tab = R.parse_markdown_tables(_section(text, "## Results per artefact"))[0]
    assert set(tab["sweep"]) == {"grid", "grid_v2"}
    assert "## Open-ended assessment (judge)" in text  # grid has judge files
    assert not list(out.glob("*ppl*.png"))  # only the asked metric is plotted
    assert R.main([str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "sweep folder not found" in capsys.readouterr().err
    assert R.main([str(sweeps[1]), "--out", str(tmp_path / "x"), "--metrics", "bad", "--no-progress"]) == 2


def test_report_without_judge_or_merges(tmp_path):
    sweep = sweep_builder.write_sweep(tmp_path, "nomerge", merges=("none",),
                                      strategies={"cpt_sft": ["cpt", "sft"]})
    path = R.build_report(sweep, tmp_path / "out", progress=False)
    text = path.read_text()
    assert "_No merges in this sweep._" in text and "## Open-ended assessment" not in text


def test_markdown_roundtrip():
    df = pd.DataFrame({"a": ["x|y", "z"], "b": [0.123456, float("nan")], "c": [True, False]})
    (back,) = R.parse_markdown_tables(R.markdown_table(df))
    assert back.to_dict("list") == {"a": ["x|y", "z"], "b": ["0.1235", "–"], "c": ["yes", "no"]}
    assert R.pct(-0.0) == "+0.0 %" and R.pct(0.1234) == "+12.3 %"


def test_report_warns_when_cells_were_evaluated_in_different_precisions(tmp_path):
    sweep = sweep_builder.write_sweep(tmp_path, "prec", merges=("none",), strategies={"cpt_sft": ["cpt", "sft"]})
    files = sorted(sweep.rglob("summary.json"))
    assert len(files) >= 2
    for i, f in enumerate(files):
        s = json.loads(f.read_text())
        s["eval_dtype"] = "bfloat16" if i == 0 else "float32"
        f.write_text(json.dumps(s))
    text = R.build_report(sweep, tmp_path / "mixed", progress=False).read_text()
    assert "different precisions" in text
    assert (f"**Warning: these cells were evaluated in different precisions** (bfloat16: 1 cell, float32: "
            f"{len(files) - 1} cells).") in text
    s = json.loads(files[0].read_text())
    del s["eval_dtype"]  # a summary written before eval.dtype existed: left out, no warning
    files[0].write_text(json.dumps(s))
    assert "different precisions" not in R.build_report(sweep, tmp_path / "one", progress=False).read_text()


# --------------------------------------------------------------------------- uncertainty
def test_comparisons_are_holm_corrected_over_the_sweep_with_one_sentence_per_claim(report, sweeps):
    from statsmodels.stats.multitest import multipletests

    comp = A.comparisons_table(sweeps[0])
    sums = _summaries(sweeps[0])
    recs = [c for s in sums.values() for c in s["comparisons"]]
    assert 0 < len(comp) < len(recs)  # cached prefixes compared in several cells count once
    _, p_adj, _, _ = multipletests(comp["p"].astype(float), method="holm")
    assert comp["p_adj"].astype(float).tolist() == pytest.approx(list(p_adj))
    assert comp["significant"].tolist() == [p < 0.05 for p in p_adj]
    r = comp.iloc[0]
    verdict = "not distinguishable from" if not r["significant"] else ("beats" if r["diff"] > 0 else "is worse than")
    assert r["claim"].startswith(f"{r['model']}/{r['a']} {verdict}" if verdict != "not distinguishable from"
                                 else f"{r['model']}/{r['a']} is not distinguishable from")
    assert f"p_adj = {r['p_adj']:.2g}" in r["claim"]
    _, text = report
    sec = _section(text, "## Paired comparisons (Holm-corrected)")
    assert f"**{int(sum(p < 0.05 for p in p_adj))} of {len(comp)} survive at α = 0.05.**" in sec
    claims = [l for l in _section(text, "### Claims").splitlines() if l.startswith("- ")]
    assert len(claims) >= len(comp[comp["kind"] != "merge_vs_parent"])
    (syn,) = R.parse_markdown_tables(_section(text, "## Synergy of merges (expected vs actual)"))
    row = syn.iloc[0]
    rec = next(x for x in sums[row["cell"]]["synergy"] if x["merged"] == row["merged"] and x["metric"] == row["metric"])
    assert row["deviation [95 % CI]"] == f"{rec['deviation']:.4f} [{rec['ci_low']:.4f}, {rec['ci_high']:.4f}]"
    assert row["p"] == f"{rec['p']:.4f}" and row["p_adj"] != "–"
    assert "comparisons.png" in text


def test_claim_sentences():
    base = {"model": "m", "a": "cpt_sft+slerp", "b": "cpt_sft", "metric": "mascqa/acc_ll", "kind": "merge_vs_parent"}
    assert A.claim_sentence({**base, "diff": 0.041, "ci_low": 0.012, "ci_high": 0.07, "p_adj": 0.0123,
                             "significant": True}) == \
        "m/cpt_sft+slerp beats cpt_sft on mascqa/acc_ll: +4.1 points [1.2, 7.0], p_adj = 0.012"
    assert A.claim_sentence({**base, "metric": "ppl", "diff": 1.5, "ci_low": 0.5, "ci_high": 2.5, "p_adj": 0.001,
                             "significant": True}).startswith("m/cpt_sft+slerp is worse than cpt_sft on ppl: +1.5 ppl")
    assert A.claim_sentence({**base, "kind": "merge_vs_mean_of_parents", "b": "mean(cpt_sft,start)", "diff": 0.0,
                             "ci_low": 0.0, "ci_high": 0.0, "p_adj": 1.0, "significant": False}) == \
        ("m/cpt_sft+slerp is not distinguishable from the mean of its parents (cpt_sft, start) on mascqa/acc_ll: "
         "+0.0 points [0.0, 0.0], p_adj = 1")


def test_seeds_are_aggregated_as_replicates(tmp_path):
    from dft.stats import seed_bootstrap

    sweep = sweep_builder.write_sweep(tmp_path, "seeds", families={"smollm2": {"base": "smollm2_135m"}},
                                      strategies={"cpt_sft": ["cpt", "sft"]}, merges=("none",), seeds=(1, 2, 3))
    df = A.load_sweep(sweep)
    assert sorted(df["seed"].unique()) == [1, 2, 3]
    seeds = A.seed_table(df)
    row = seeds[(seeds["artefact"] == "cpt_sft") & (seeds["metric"] == ACC)].iloc[0]
    vals = df[df["artefact"] == "cpt_sft"].sort_values("seed")[ACC].to_numpy()
    ref = seed_bootstrap(vals, 40)
    assert (row["n_seeds"], row["seeds"], row["levels"]) == (3, "1,2,3", "seeds, items")
    assert (row["mean"], row["seed_sd"], row["item_se"]) == pytest.approx((ref["mean"], ref["seed_sd"], ref["item_se"]))
    # the table's rows share one vectorised bootstrap: the same interval up to resampling noise
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref["ci_low"], ref["ci_high"]), abs=0.02)
    assert A.seed_table(df).equals(seeds)  # fixed seed: reproducible
    assert seeds[seeds["metric"] == "ppl"]["levels"].eq("seeds").all()
    text = R.build_report(sweep, tmp_path / "out", progress=False).read_text()
    (tab,) = R.parse_markdown_tables(_section(text, "## Seeds as replicates"))
    t = tab[(tab["artefact"] == "cpt_sft") & (tab["metric"] == ACC)].iloc[0]
    assert t["mean [95 % CI]"] == f"{row['mean']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"


def test_old_summaries_without_uncertainty_still_load_and_the_report_says_what_is_missing(tmp_path):
    sweep = sweep_builder.write_sweep(tmp_path, "old", merges=("none", "slerp"), strategies={"cpt_sft": ["cpt", "sft"]},
                                      uncertainty=False)
    s = sweep_builder.read_summaries(sweep)
    assert "comparisons" not in s[0] and "matsci_mcq/acc_ci_low" not in s[0]["artefacts"][0]["metrics"]
    text = R.build_report(sweep, tmp_path / "out", progress=False).read_text()
    assert f"**Note: {len(s)} cell(s) have no intervals and {len(s)} cell(s) no paired comparisons" in text
    assert "_No paired comparisons recorded in these summaries._" in text
    tab = R.parse_markdown_tables(_section(text, "## Results per artefact"))[0]
    assert not tab[ACC].str.contains(r"\[").any()  # bare values: no interval was recorded


def test_report_on_a_sweep_without_evaluation(tmp_path):
    """issue 22 item 1: eval=none summaries (artefacts without metrics) crashed with KeyError 'baseline_of'."""
    sweep = sweep_builder.write_sweep(tmp_path, "noeval", merges=("none",), strategies={"cpt_sft": ["cpt", "sft"]},
                                      uncertainty=False)
    for f in sweep.rglob("summary.json"):
        s = json.loads(f.read_text())
        for a in s["artefacts"]:
            a["metrics"] = {}
        s.update(synergy=[], metrics={}, eval="none", eval_dtype=None)
        f.write_text(json.dumps(s))
    assert R.main([str(sweep), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "_No evaluation metrics in these summaries (eval=none, or nothing finished evaluating)" in text
    assert "## Training" in text and "Note:" not in text


@pytest.mark.slow  # a real 2-cell sweep; the default suite: synthetic seeds and Holm above, a real report in test_train_e2e.py
def test_real_tiny_sweep_with_two_seeds(tmp_path, tiny_model):
    """A real two-seed sweep of the tiny model: seed aggregation, comparisons and Holm in the report."""
    from conftest import run_train

    run_train(["-m", "seed=1,2", "strategy=cpt", "merge=slerp", "model=tiny", "data=tiny", "logger=none",
               "eval.benchmarks=[mascqa]", "eval.max_items=6", "eval.max_new_tokens=2", "eval.ppl_max_tokens=300",
               "strategy.cpt.trainer.max_steps=1", "experiment=seeds"], tmp_path)
    sweep = tmp_path / "seeds"
    sums = sweep_builder.read_summaries(sweep)
    assert sorted(s["seed"] for s in sums) == [1, 2]
    text = R.build_report(sweep, tmp_path / "out", progress=False).read_text()
    # seeds: one row per artefact and metric, two seeds each
    (seeds,) = R.parse_markdown_tables(_section(text, "## Seeds as replicates"))
    assert set(seeds["seeds"]) == {"1,2"} and {"start", "cpt", "cpt+slerp"} <= set(seeds["artefact"])
    # the start model's evaluation does not depend on the seed: one cache entry, zero between-seed spread
    starts = [next(a for a in s["artefacts"] if a["name"] == "start") for s in sums]
    assert starts[0]["key"] == starts[1]["key"] and starts[0]["metrics"] == starts[1]["metrics"]
    assert set(seeds[seeds["artefact"] == "start"]["seed_sd"]) == {"0.0000"}
    # comparisons: cpt vs start and the merge vs both parents and their mean, per seed (distinct stages)
    comp = A.comparisons_table(sweep)
    assert {"stage_vs_parent", "merge_vs_parent", "merge_vs_mean_of_parents"} == set(comp["kind"])
    assert comp["p_adj"].notna().all() and (comp["p_adj"].astype(float) >= comp["p"].astype(float) - 1e-12).all()
    (tab,) = [t for t in R.parse_markdown_tables(_section(text, "## Paired comparisons (Holm-corrected)"))
              if "p_adj" in t]
    assert len(tab) == len(comp)
    # a merge whose items equal its parent's (the 1-step tiny model barely moves) is not distinguishable
    for s in sums:
        cell = Path(s["run_dir"])
        items = {a: [it["correct_ll"] for it in json.loads((cell / "eval" / a / "mascqa.json").read_text())["items"]]
                 for a in ("cpt", "cpt+slerp")}
        if items["cpt"] == items["cpt+slerp"]:
            rec = next(c for c in s["comparisons"] if (c["a"], c["b"], c["metric"]) == ("cpt+slerp", "cpt", "mascqa/acc_ll"))
            assert (rec["diff"], rec["p"], rec["n10"], rec["n01"]) == (0.0, 1.0, 0, 0)
            assert "tiny/cpt+slerp is not distinguishable from its parents on mascqa/acc_ll: +0.0 points [0.0, 0.0] vs cpt" in text
            break
    else:
        pytest.fail("no cell whose merge answered like its parent")
