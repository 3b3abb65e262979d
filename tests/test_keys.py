"""dft.keys: the role keys (start/ trained/ merged/ final/ delta/) every cell shares, and flat config keys."""

from __future__ import annotations

import math

import pytest

from dft.keys import FLAT_CONFIG_KEYS, flat_config, role_artefacts, uniform_metrics
from tests.fixtures.sweep_builder import read_summaries, write_sweep

STRATEGIES = {"cpt": ["cpt"], "cpt_sft": ["cpt", "sft"], "cpt_sft_dpo": ["cpt", "sft", "dpo"],
              "cpt_sft_orpo": ["cpt", "sft", "orpo"]}


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    sweep = write_sweep(tmp_path_factory.mktemp("keys"), strategies=STRATEGIES)
    return {s["cell"]: s for s in read_summaries(sweep)}


def _by_name(summary):
    return {a["name"]: a for a in summary["artefacts"]}


def test_every_cell_has_the_same_start_final_delta_keys(summaries):
    assert len(summaries) == 2 * 4 * 3  # 3 models (smollm2 base + instruct, mistral base) x 4 strategies x 2 merges
    keysets = {frozenset(k for k in uniform_metrics(s) if k.split("/")[0] in ("start", "final", "delta"))
               for s in summaries.values()}
    assert len(keysets) == 1
    (keys,) = keysets
    base = ("matsci_mcq/acc", "matsci_mcq/acc_ll", "ppl")
    intervals = {f"{m}{sfx}" for m in base for sfx in ("_ci_low", "_ci_high", "_stderr")} | {"matsci_mcq/n"}
    # start and final carry each metric with its interval and item count; delta differences the metrics only
    assert keys == ({f"{r}/{m}" for r in ("start", "final") for m in (*base, *intervals)}
                    | {f"delta/{m}" for m in base})


def test_roles_pick_the_right_artefacts_and_delta_is_final_minus_start(summaries):
    s = summaries["merge=slerp,model=smollm2_135m,strategy=cpt_sft_dpo"]
    arts = _by_name(s)
    u = uniform_metrics(s)
    assert (u["artefact/start"], u["artefact/trained"], u["artefact/merged"], u["artefact/final"]) == (
        "start", "cpt_sft_dpo", "cpt_sft_dpo+slerp", "cpt_sft_dpo+slerp")
    for role, name in (("start", "start"), ("trained", "cpt_sft_dpo"), ("merged", "cpt_sft_dpo+slerp"),
                       ("final", "cpt_sft_dpo+slerp")):
        for metric, value in arts[name]["metrics"].items():
            assert u[f"{role}/{metric}"] == value
    for metric in ("matsci_mcq/acc", "matsci_mcq/acc_ll", "ppl"):
        assert u[f"delta/{metric}"] == arts["cpt_sft_dpo+slerp"]["metrics"][metric] - arts["start"]["metrics"][metric]
    # the uniform keys equal the per-artefact flat keys of the same artefact
    assert u["final/matsci_mcq/acc"] == s["metrics"]["eval/cpt_sft_dpo+slerp/matsci_mcq/acc"]
    # the partner (instruct model) is never a role
    assert "partner" in arts and "partner" not in {v for k, v in u.items() if k.startswith("artefact/")}


def test_without_a_merge_final_is_the_last_stage(summaries):
    s = summaries["merge=none,model=mistral_7b_v0_3,strategy=cpt_sft_orpo"]
    u = uniform_metrics(s)
    assert u["artefact/final"] == u["artefact/trained"] == "cpt_sft_orpo"
    assert not any(k.startswith("merged/") or k == "artefact/merged" for k in u)
    ppl = _by_name(s)["cpt_sft_orpo"]["metrics"]["ppl"]
    assert u["final/ppl"] == u["trained/ppl"] == ppl
    assert math.isclose(u["delta/ppl"], ppl - _by_name(s)["start"]["metrics"]["ppl"])


def test_merge_after_each_stage_takes_the_merge_of_the_last_stage(tmp_path):
    sweep = write_sweep(tmp_path, strategies={"cpt_sft": ["cpt", "sft"]}, merges=("slerp",), merge_at="each",
                        families={"smollm2": {"base": "smollm2_135m", "instruct": "smollm2_135m_instruct"}})
    s = next(x for x in read_summaries(sweep) if x["model"] == "smollm2_135m")
    assert [a["name"] for a in s["artefacts"]] == ["start", "partner", "cpt", "cpt+slerp", "cpt_sft", "cpt_sft+slerp"]
    r = role_artefacts(s)
    assert (r["trained"]["name"], r["merged"]["name"], r["final"]["name"]) == ("cpt_sft", "cpt_sft+slerp", "cpt_sft+slerp")


def test_a_cell_that_trains_nothing_has_final_equal_start_and_zero_delta():
    arts = [{"name": "start", "kind": "start", "parents": [], "metrics": {"b/acc": 0.25, "ppl": 12.0, "b/acc_ll": None}}]
    u = uniform_metrics(arts)
    assert u == {"artefact/start": "start", "start/b/acc": 0.25, "start/ppl": 12.0,
                 "artefact/final": "start", "final/b/acc": 0.25, "final/ppl": 12.0, "delta/b/acc": 0.0, "delta/ppl": 0.0}


def test_intervals_are_copied_into_roles_but_not_differenced():
    arts = [{"name": "start", "kind": "start", "metrics": {"b/acc": 0.5, "b/acc_ci_low": 0.4, "b/acc_ci_high": 0.6,
                                                           "b/acc_stderr": 0.05}},
            {"name": "sft", "kind": "stage", "metrics": {"b/acc": 0.75, "b/acc_ci_low": 0.65, "b/acc_ci_high": 0.85,
                                                         "b/acc_stderr": 0.04}}]
    u = uniform_metrics({"artefacts": arts})
    assert (u["final/b/acc_ci_low"], u["final/b/acc_ci_high"], u["final/b/acc_stderr"]) == (0.65, 0.85, 0.04)
    assert u["start/b/acc_ci_low"] == 0.4 and u["delta/b/acc"] == 0.25
    assert [k for k in u if k.startswith("delta/")] == ["delta/b/acc"]


def test_a_summary_without_artefacts_is_a_clear_error():
    with pytest.raises(KeyError, match="no 'artefacts' list"):
        uniform_metrics({"metrics": {}})


def test_flat_config_from_a_summary_and_from_the_composed_config_agree(summaries):
    from tests.conftest import compose

    s = summaries["merge=slerp,model=smollm2_135m,strategy=cpt_sft_dpo"]
    f = flat_config(s)
    assert tuple(f) == FLAT_CONFIG_KEYS
    assert f == {"model": "smollm2_135m", "family": "smollm2", "start": "base", "strategy": "cpt_sft_dpo",
                 "chain": "cpt_sft_dpo", "merge": "slerp", "peft": "lora", "seed": 0, "data": "materials", "eval": "quick"}
    cfg = compose(["model=smollm2_135m", "strategy=cpt_sft_dpo", "merge=slerp", "seed=0"])
    # the same cell composed from conf/ (the embedded SmolLM2 is an instruct model; the fixture says base)
    assert flat_config(cfg) == {**f, "start": "instruct"}
    assert flat_config(compose(["strategy=none"]))["chain"] == ""


def test_cell_summary_carries_the_uniform_keys_beside_the_per_artefact_ones(tmp_path):
    from dft.pipeline import Artefact, Cell
    from tests.conftest import compose

    cfg = compose(["model=tiny", "strategy=sft", "merge=none", f"paths.runs={tmp_path}/runs",
                   f"paths.stages={tmp_path}/stages"])
    cell = Cell(cfg, tmp_path / "run", "c")
    cell.artefacts = [Artefact(name="start", kind="start", path=tmp_path, key="k0", metrics={"b/acc": 0.25, "ppl": 9.0}),
                      Artefact(name="sft", kind="stage", path=tmp_path, key="k1", stages=["sft"],
                               metrics={"b/acc": 0.5, "ppl": 7.0})]
    m = cell.summary([], None)["metrics"]  # what summary.json and the W&B run summary get
    assert m == {"eval/start/b/acc": 0.25, "eval/start/ppl": 9.0, "eval/sft/b/acc": 0.5, "eval/sft/ppl": 7.0,
                 "artefact/start": "start", "start/b/acc": 0.25, "start/ppl": 9.0,
                 "artefact/trained": "sft", "trained/b/acc": 0.5, "trained/ppl": 7.0,
                 "artefact/final": "sft", "final/b/acc": 0.5, "final/ppl": 7.0, "delta/b/acc": 0.25, "delta/ppl": -2.0}


def _wandb_offline(run_dir):
    """(config, summary) of an offline W&B run, read from its ``run-*.wandb`` file (wandb 0.31 ships no
    Python reader for it): the LevelDB-style log W&B writes (7-byte file header ``:W&B``, 32 KiB blocks, records ``<crc32, length, type>``
    of type full/first/middle/last), each record a ``wandb_internal_pb2.Record``."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, payloads, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            payloads.append(buf + chunk)
        else:
            break
    config, summary = {}, {}
    for p in payloads:
        rec = pb.Record()
        rec.ParseFromString(p)
        which = rec.WhichOneof("record_type")
        if which == "config":  # later updates (the Trainer's arguments)
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif which == "run":  # wandb.init(config=...)
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif which == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
    return config, summary


@pytest.mark.slow  # 4 tiny cells: ~2-4 min on 2 cores
def test_a_real_tiny_sweep_shares_the_uniform_keys_in_summary_json_and_wandb(tmp_path, tiny_model):
    import json

    from tests.conftest import run_train

    run_train(["-m", "strategy=sft,dpo", "merge=none,slerp", "model=tiny", "data=tiny", "eval.max_items=2",
               "eval.ppl_max_tokens=200", "eval.max_new_tokens=2", "logger.mode=offline",
               "strategy.sft.trainer.max_steps=1", "strategy.dpo.trainer.max_steps=1", "experiment=keys"], tmp_path)
    cells = sorted(d for d in (tmp_path / "keys").iterdir() if (d / "summary.json").exists())
    assert len(cells) == 4
    keysets = set()
    for cell in cells:
        s = json.loads((cell / "summary.json").read_text())
        m = s["metrics"]
        shared = frozenset(k for k in m if k.split("/")[0] in ("start", "final", "delta"))
        keysets.add(shared)
        assert m == {**m, **uniform_metrics(s)}  # summary.json holds exactly what dft.keys computes
        final = s["artefacts"][-1]
        assert m["artefact/final"] == final["name"] == (f"{s['chain'][0]}+slerp" if s["merge"] == "slerp" else s["chain"][0])
        for metric, v in final["metrics"].items():
            assert m[f"final/{metric}"] == v == m[f"eval/{final['name']}/{metric}"]
            assert m[f"delta/{metric}"] == pytest.approx(v - s["artefacts"][0]["metrics"][metric])
        runs = list((cell / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        config, summary = _wandb_offline(runs[0])
        assert {k: summary[k] for k in shared} == {k: m[k] for k in shared}
        assert config["cell"] == flat_config(s)  # the flat grouping keys, as summary.json has them
    assert len(keysets) == 1
    (keys,) = keysets
    assert {"final/ppl", "start/ppl", "delta/ppl", "final/mascqa/acc_ll", "delta/mascqa/acc_ll"} <= keys
