"""One driver per experiment: a claim on the experiment directory that a second driver sees.

Two drivers on one experiment each drop the other's rows and append to one Optuna study, so a
driver claims the experiment before it writes anything and holds the claim until it exits.

- Local and NFS paths: a kernel lock (``flock``) on ``<experiment>/driver.lock``. The kernel
  releases it when the holder dies, SIGKILL included, so ``--resume`` after a killed driver
  needs no manual step. The file itself stays and says who held it last.
- ``s3://`` and ``gs://`` (no locks): a lease, ``<experiment>/driver.lease``, that the holder
  renews every ``LEASE_RENEW_SECONDS``. A lease not renewed for ``LEASE_TTL_SECONDS`` belongs
  to a dead driver and is taken over; a killed driver's experiment can be resumed after that.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from newllm.experiment import LEASE_FILE, LOCK_FILE, read_file, write_file

LEASE_RENEW_SECONDS = 30.0
LEASE_TTL_SECONDS = 120.0
LEASE_SETTLE_SECONDS = 2.0  # object stores are last-writer-wins: read back after this to see who won


class ExperimentHeld(Exception):
    """Another live driver holds the experiment."""


@dataclass(frozen=True)
class Holder:
    """Who claimed an experiment: a driver process, and when it claimed it."""

    host: str
    pid: int
    started: float
    token: str = ""
    renewed: float = 0.0

    @staticmethod
    def me() -> Holder:
        now = time.time()
        return Holder(socket.gethostname(), os.getpid(), now, uuid.uuid4().hex, now)

    @staticmethod
    def parse(data: bytes | None) -> Holder | None:
        try:
            return Holder(**json.loads(data)) if data else None
        except (ValueError, TypeError):
            return None  # a claim cut off mid-write: nobody we can name

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}"


def held_message(directory: str, holder: Holder | None) -> str:
    """Why a second driver cannot start: who holds the experiment, and what to do."""
    who = holder.describe() if holder else "a driver that has not yet written its name"
    return (f"experiment {directory} is held by another driver ({who}): wait for it to finish, or stop it "
            f"and pass --resume; two drivers on one experiment would lose each other's results")


class ExperimentLock:
    """The claim of this process on the experiment ``directory`` (see the module docstring)."""

    def __init__(self, directory: str, lease: bool | None = None):
        self.directory = directory.rstrip("/")
        self.lease = "://" in directory if lease is None else lease
        self._fd: int | None = None
        self._me: Holder | None = None
        self._stop = threading.Event()

    @property
    def path(self) -> str:
        return f"{self.directory}/{LEASE_FILE if self.lease else LOCK_FILE}"

    def holder(self) -> Holder | None:
        """The live driver that holds the experiment now, None if it is free. Writes nothing."""
        if self.lease:
            holder = Holder.parse(read_file(self.path))
            return holder if holder is not None and time.time() - holder.renewed < LEASE_TTL_SECONDS else None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it (this probe's own shared lock goes with the close)
        except BlockingIOError:
            return self._named_holder(fd)
        finally:
            os.close(fd)

    def check_free(self) -> None:
        """ExperimentHeld if another live driver holds the experiment."""
        holder = self.holder()
        if holder is not None:
            raise ExperimentHeld(held_message(self.directory, holder))

    def acquire(self) -> None:
        """Claim the experiment (making its directory), or ExperimentHeld naming the holder."""
        if self.lease:
            self._take_lease()
            return
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._named_holder(fd)
            os.close(fd)
            raise ExperimentHeld(held_message(self.directory, holder)) from None
        self._me = Holder.me()
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._me.to_bytes(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the claim up (a process that exits gives it up too)."""
        self._stop.set()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExperimentLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def _named_holder(fd: int, tries: int = 50) -> Holder | None:
        """The holder's name from its lock file: a driver that has just taken the lock writes it
        next, so a brief empty file is retried (bounded: 50 x 20 ms)."""
        for _ in range(tries):
            holder = Holder.parse(os.pread(fd, 4096, 0))
            if holder is not None:
                return holder
            time.sleep(0.02)
        return None

    def _take_lease(self) -> None:
        current = self.holder()
        if current is not None:
            raise ExperimentHeld(held_message(self.directory, current))
        self._me = Holder.me()
        write_file(self.path, self._me.to_bytes())
        time.sleep(LEASE_SETTLE_SECONDS)
        winner = Holder.parse(read_file(self.path))
        if winner is None or winner.token != self._me.token:
            raise ExperimentHeld(held_message(self.directory, winner))
        threading.Thread(target=self._renew, name="newllm-lease", daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            self._me = Holder(**{**asdict(self._me), "renewed": time.time()})
            try:
                write_file(self.path, self._me.to_bytes())
            except OSError:
                pass  # a passing storage fault: the next renewal tries again, well within the TTL
