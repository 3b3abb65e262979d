#!/usr/bin/env bash
# The paper's grid on a SLURM cluster, one GPU per cell (launcher=slurm). Run from the repo root
# on a login node, after ./bootstrap.sh, with conf/local/slurm.yaml naming your partition/account
# (see conf/local/README.md). The shell waits for the whole grid; see submit_detached.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Check first: compose every cell and print its plan without training (runs in this process).
python -m dft.train -m experiment=smol_grid dry_run=true \
    model=smollm_1_7b_instruct strategy=sft,cpt_sft,cpt_sft_dpo,cpt_sft_orpo merge=none,slerp

# 4 strategies x 2 merges = 8 cells = one graph: each distinct stage (cpt, cpt_sft, dpo, orpo), merge
# and evaluation is one job, started when its parents end (afterok), none waiting on a lock.
# launcher=slurm_cells instead: one job array of 8 cells, cells sharing a prefix wait on its lock.
python -m dft.train -m launcher=slurm experiment=smol_grid \
    model=smollm_1_7b_instruct strategy=sft,cpt_sft,cpt_sft_dpo,cpt_sft_orpo merge=none,slerp \
    launcher.timeout_min=480 launcher.mem_gb=64 launcher.cpus_per_task=8
    # launcher.partition=gpu launcher.account=my_project   # if not in conf/local/slurm.yaml
    # 'launcher.setup=["module load cuda/12.4"]'            # shell lines before each cell

# Afterwards: python -m dft.report runs/smol_grid   (tables and plots from every summary.json)
