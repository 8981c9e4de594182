"""Launchers for Slurm: one ``torchrun`` per node, the signal path, and requeue-and-resume.

- :mod:`~ssa_megatron.launch.node`: the per-node ``torchrun`` command (rendezvous, processes and
  threads from the allocation, USR1/USR2 ignored by ``torchrun`` so that they reach the trainer);
- :mod:`~ssa_megatron.launch.status`: what the trainer's ``exit_status.json`` says (finished, saved, crashed)
  and what the batch script does next (finish, ``scontrol requeue``, fail);
- :mod:`~ssa_megatron.launch.submitit_job`: the same training submitted through submitit.

None of them imports torch or Megatron: they run in the batch shell and the submitting process.
"""
