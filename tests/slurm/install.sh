#!/usr/bin/env bash
# Installs what the local SLURM test cluster (tests/slurm/cluster.sh) needs, from Debian's packages:
# munge (authentication), slurmctld (controller), slurmd (compute node daemon, started twice as n1/n2),
# slurm-client (sbatch, srun, scontrol, squeue, scancel). Idempotent; needs root (CI runs as root).
set -euo pipefail

packages=(munge slurmctld slurmd slurm-client)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "tests/slurm/install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the recommends pull in mail and X libraries the cluster never uses.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "tests/slurm/install.sh: $(dpkg-query -W -f="\${Package} \${Version}  " "${packages[@]}")"
