#!/usr/bin/env bash
# Three ways to submit a grid without keeping a terminal open. `python -m dft.train -m` waits for
# every cell by default, and exits non-zero as soon as one fails (naming it); the cells are SLURM
# jobs and keep running whatever happens to the submitting shell.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC2054  # commas are Hydra sweep values, not separators
GRID=(launcher=slurm experiment=smol_grid model=smollm_1_7b_instruct strategy=sft,cpt_sft merge=none,slerp)

# 1. nohup: the waiting process survives hang-up; its log says when the grid is done or what failed.
mkdir -p runs
nohup python -m dft.train -m "${GRID[@]}" > runs/smol_grid.submit.log 2>&1 &
echo "waiting process: pid $!  (tail -f runs/smol_grid.submit.log)"

# 2. tmux (or screen): also survives logins nodes that kill a user's processes at logout.
#    tmux new -d -s smol_grid "python -m dft.train -m ${GRID[*]} 2>&1 | tee runs/smol_grid.submit.log"

# 3. launcher.wait=false: sbatch, print the job id, return. Nothing watches the grid; check it with
#    squeue -j <id>, sacct -j <id>, and the cells' summary.json under runs/smol_grid/.
#    python -m dft.train -m "${GRID[@]}" launcher.wait=false
