"""What goes wrong in a long distributed job, and how every rank handles it together.

- `timeouts`: the two bounds on a stalled job (start-up and step), plain data;
- `watchdog`: a rank that stops making progress ends the job within its bound, naming it (exit 76);
- `preemption`: `PreemptionWatch`: SIGTERM/SIGUSR1 set a flag, the ranks agree at step boundaries;
- `lease`: one run per output folder, with a heartbeat; taken over from dead or stale holders;
- `write_failures`: a failed write said in one line (disk full, I/O, permission), learnt by every rank;
- `agreement`: the lowest failing rank and what it has, at O(1) per rank (also used by the checkpoints);
- `elastic`: torchrun's in-job restarts: restarted workers rejoin on a per-attempt store prefix.

These modules import nothing from the rest of the launcher but `launcher.errors` (and each other).
"""
