#!/usr/bin/env bash
# Full fine-tuning of an 8B model: one whole 8-GPU node per cell (launcher=slurm_8gpu: 8 tasks,
# one per GPU, DDP over NCCL; dft.distributed picks cuda:<local_rank>). LoRA/QLoRA fit on one GPU:
# use sweep_slurm.sh for those. For ZeRO-3/FSDP see conf/accelerate/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

python -m dft.train -m launcher=slurm_8gpu experiment=llama_full \
    model=llama3_1_8b_instruct peft=full strategy=sft,sft_dpo merge=none \
    launcher.timeout_min=1440
    # launcher.mem_gb=0 (the default here) asks for all of the node's memory
    # launcher.cpus_per_task=8 x 8 tasks = 64 CPUs: lower it on smaller nodes
    # launcher.constraint=h100                       # cluster-specific: better in conf/local/
