#!/usr/bin/env python
"""Submit a training run to Slurm through submitit (also installed as ``ssa-submit``).

    python tools/submit.py --config configs/llama1b_ssa_h100.yaml --nodes 4 --partition gpu -- --save-interval 1000
    python tools/submit.py --local --config configs/tiny_cpu.yaml --timeout-min 30 -- --train-iters 40

Preempted or timed out, the run saves, is requeued and resumes; see ssa_megatron/launch/submitit_job.py.
"""

from ssa_megatron.launch.submitit_job import main

if __name__ == "__main__":
    main()
