"""Slurm: requeue the job after a pre-emption save, as PyTorch Lightning's SLURM support does.

Submit with ``#SBATCH --signal=USR1@120`` (SIGUSR1 two minutes before the time limit) and
``#SBATCH --requeue``; on SIGUSR1 the run finishes its step, saves, and requeues its job with
``scontrol requeue $SLURM_JOB_ID``. The requeued job runs the same script, which resumes when the
run folder holds a run (README, "Clusters")."""

from __future__ import annotations

import shutil
import subprocess


def requeue(job_id: str) -> str:
    """Ask Slurm to requeue ``job_id``; returns one sentence saying what happened."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM_JOB_ID is {job_id} but scontrol is not on PATH: requeue the job by hand."
    try:
        done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue {job_id} failed ({e}): requeue the job by hand."
    if done.returncode != 0:
        return (f"scontrol requeue {job_id} failed (exit {done.returncode}: {done.stderr.strip()[:200]}): "
                f"requeue the job by hand.")
    return f"Slurm job {job_id} requeued (scontrol requeue)."
