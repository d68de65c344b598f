"""Preemption: a stop signal ends the run at the next optimizer-step boundary with a checkpoint of that step.

Slurm warns a job before its time limit or a preemption with a signal (launch/slurm_mixtral_8x22b.sbatch asks for
SIGUSR1 300 s ahead and has torchrun forward it to the workers); ``scancel``, a time limit, torchrun's own shutdown
and the launcher's death (parallel/launch.py die_with_launcher) send SIGTERM. Without a handler either signal ends
the process at once and everything since the last periodic checkpoint is lost.

SIGINT (Ctrl-C) and SIGHUP (the SSH session that ran the command hung up; torchrun forwards it to its workers) are
handled the same way: before, Ctrl-C gave a KeyboardInterrupt traceback and a hang-up killed the workers, both
without a checkpoint. A SECOND Ctrl-C, at least INTERRUPT_GRACE_S after the first, aborts at once
(KeyboardInterrupt): a user who does not want to wait for the checkpoint says so (the grace period ignores the copy
of the same Ctrl-C that torchrun forwards to workers which already got it from the terminal).

``StopSignals`` handles SIGTERM, SIGUSR1, SIGINT and SIGHUP while ``fit`` runs (installed by ``handles_stop_signals`` in the main
thread, the previous handlers restored on the way out). The handler only sets a flag: it may interrupt anything,
a collective or a checkpoint write included, and doing work there could tear the state it interrupted. The loop
asks after each optimizer step whether ANY rank got a signal; every rank must stop at the same step, or the
checkpoint (a collective) would hang. The Trainer adds its rank's vote to the all-reduce of the step's loss terms it
makes anyway (no extra collective per step): a signal that arrives after that all-reduce is counted at the next
step. Ada-K, whose step has no such scalar all-reduce to share, makes one one-element all-reduce per step
(``agree_now``), negligible beside its several forwards per step.

Then every rank writes the checkpoint of that step (unless the periodic one just did), logs, and raises
``Preempted``: a SystemExit with code 0, so the process (a plain ``moe-train train``, a torchrun worker) exits
cleanly without a traceback, and starting the same command again resumes from that checkpoint (train.resume is
true by default) with nothing lost; Ada-K too (train/adak.py: its checkpoints hold the allocators, not the frozen
base).

A worker blocked in a collective (a peer was SIGKILLed) never reaches the step boundary: it ends at the collective
timeout (parallel.collective_timeout_s) or when its launcher escalates to SIGKILL (torchrun --shutdown-timeout,
Slurm's KillWait). A second signal does not escalate: under Slurm a worker may get the same signal twice (from
slurmstepd and forwarded by torchrun) and must still finish its checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from moe_train.parallel.collectives import all_reduce_sum
from moe_train.parallel.distributed import ParallelContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
INTERRUPT_GRACE_S = 2.0  # a second SIGINT this long after the first aborts at once (module docstring)
# launch/torchrun.sh names a folder here; each worker that stopped cleanly after a signal writes its LOCAL_RANK into
# it, and the script exits 0 when every local worker did (torchrun itself exits 1 after a signal)
MARKER_DIR_ENV = "MOE_TRAIN_PREEMPTED_DIR"
PREEMPTED_EXIT_CODE = 0  # the checkpoint is written, nothing is lost; a requeue or rerun resumes (launch/*.sbatch)

# Every rank says when it stops (the training logger shows rank 0 only): the lines must agree on the step.
rank_log = logging.getLogger("moe_train.preemption")


class Preempted(SystemExit):
    """Raised on every rank at the step boundary after a stop signal, once the checkpoint of ``step`` is written.

    A SystemExit with code PREEMPTED_EXIT_CODE: uncaught (the CLI, a torchrun worker) it ends the process cleanly
    without a traceback; a library caller catches it to tell a preemption from a finished run."""

    def __init__(self, step: int, signal_name: str, checkpoint: Optional[Path]):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint

    def __str__(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint is not None else "no checkpoint"
        return f"stopped by {self.signal_name} after step {self.step} ({where})"


class StopSignals:
    """The stop flag of one run: ``received`` (this rank got a signal) and ``stop`` (some rank did: agreed)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[signal.Signals] = None  # the first stop signal this rank got
        self.stop = False  # set by agree / agree_now: some rank got one, every rank stops at this step
        self._previous: dict[signal.Signals, object] = {}
        self._first_interrupt: Optional[float] = None

    def _handle(self, signum: int, frame) -> None:
        # Only the flag (module docstring); a repeated signal keeps the first one's name.
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is not None and now - self._first_interrupt >= INTERRUPT_GRACE_S:
                raise KeyboardInterrupt("second Ctrl-C: aborted without waiting for the checkpoint")
            if self._first_interrupt is None:
                self._first_interrupt = now
                rank_log.warning("Ctrl-C: stopping after the current step with a checkpoint (Ctrl-C again to abort "
                                 "at once, losing it)")
        if self.received is None:
            self.received = signal.Signals(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handlers for the stop signals while the block runs; the previous ones restored after, also on errors."""
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only; a run started from another thread keeps the default
            # actions (the signals end the process at once) and says so.
            rank_log.warning("training runs outside the main thread: SIGTERM / SIGUSR1 / SIGINT / SIGHUP are not "
                             "handled, a preemption loses the steps since the last checkpoint")
            yield self
            return
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, previous in self._previous.items():
                # None: the previous handler was not installed from Python; the default action is the safe choice
                signal.signal(s, signal.SIG_DFL if previous is None else previous)
            self._previous.clear()

    def vote(self, device: torch.device) -> torch.Tensor:
        """This rank's vote, to all-reduce (sum or mean) with the step's other scalars: 1 if it got a signal."""
        return torch.tensor([0.0 if self.received is None else 1.0], device=device)

    def agree(self, reduced_vote: float) -> bool:
        """From the all-reduced votes (any rank's signal stops every rank); True when the run must stop now."""
        self.stop = self.stop or reduced_vote > 0
        return self.stop

    def agree_now(self, ctx: ParallelContext) -> bool:
        """``agree`` with its own one-element all-reduce (for loops that have no per-step scalar all-reduce)."""
        return self.agree(float(all_reduce_sum(self.vote(ctx.device), ctx)))

    def reason(self) -> str:
        """What this rank saw: its own signal's name, or that the stop came from another rank."""
        return self.received.name if self.received is not None else "a stop signal on another rank"


def mark_preempted(env: Optional[dict] = None) -> None:
    """Tells launch/torchrun.sh that this worker stopped cleanly after a signal (its checkpoint is written): a file
    named after LOCAL_RANK in the folder MARKER_DIR_ENV names; nothing when it is unset (not that launcher)."""
    env = os.environ if env is None else env
    folder = env.get(MARKER_DIR_ENV)
    if not folder:
        return
    try:
        (Path(folder) / f"rank_{env.get('LOCAL_RANK', '0')}").write_text("preempted\n")
    except OSError as e:  # the launcher then reports torchrun's own exit status: no reason to fail the exit here
        rank_log.warning(f"could not write the preemption marker in {folder}: {e}")


def handles_stop_signals(fit: Callable) -> Callable:
    """Decorates a Trainer's ``fit``: SIGTERM / SIGUSR1 / SIGINT / SIGHUP set ``self.preemption``'s flag while it runs."""

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        with self.preemption.installed():
            try:
                return fit(self, *args, **kwargs)
            except Preempted:  # the checkpoint is written (Trainer.stop_if_preempted): tell the launcher
                mark_preempted()
                raise

    return wrapper
