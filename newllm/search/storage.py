"""Where a search keeps things: the storage root of its experiments, checked before anything is
written; the Optuna study's storage (a journal file or an RDB URL), opened and checked up
front, with a journal cut off mid-record (a killed driver, a full disk) repaired before anything
is appended to it; and the trials' checkpoints, thinned when the search ends."""

from __future__ import annotations

import copy
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pyarrow.fs
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from sqlalchemy.engine import make_url

from newllm.checks import check_writable_dir, path_arg
from newllm.experiment import OPTUNA_JOURNAL, checkpoint_dir, filesystem, load

OBJECT_STORES = ("s3", "gs")
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "beegfs", "glusterfs", "fuse")
FINISHED = tuple(state for state in optuna.trial.TrialState if state.is_finished())
JOURNAL_TAIL_BYTES = 1 << 16  # a journal record is far shorter: the tail's last newline lies within


class StorageError(ValueError):
    """A storage path or URL that cannot be used; the message names it and the problem."""


def storage_root(path: str) -> str:
    """``--storage-path`` as Tune takes it: a URI as given, a local path made absolute."""
    return path if "://" in path else str(Path(path).resolve())


def check_storage_path(path: str) -> None:
    """StorageError for a ``--storage-path`` that cannot hold experiments."""
    if "://" in path:
        scheme = path.split("://", 1)[0]
        if scheme not in OBJECT_STORES:
            raise StorageError(f"--storage-path {path}: unknown scheme {scheme}://; use a local directory, a "
                               f"shared mount, s3:// or gs://")
        return
    try:
        check_writable_dir(path_arg(path, "--storage-path"), f"--storage-path {path}")
    except ValueError as e:
        raise StorageError(str(e)) from None


def filesystem_type(path: str) -> str | None:
    """The type of the file system holding ``path`` (Linux /proc/mounts), or None if unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = os.path.realpath(path)
    inside = [(m, t) for m, t in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    return max(inside, key=lambda mt: len(mt[0]))[1] if inside else None


def storage_warning(storage: str, num_nodes: int) -> str | None:
    """A warning when a multi-node cluster gets a storage path that only this machine sees."""
    if num_nodes <= 1 or "://" in storage:
        return None
    fs = filesystem_type(storage)
    if fs is not None and fs.split(".")[0] in NETWORK_FILESYSTEMS:
        return None
    return (f"warning: --storage-path {storage} is a local directory ({fs or 'unknown'} file system), but the "
            f"Ray cluster has {num_nodes} nodes. Trials on other machines would write their checkpoints to "
            f"their own disks, where a retry on another node and this driver cannot find them. Use storage "
            f"every node mounts (NFS), or s3:// / gs://. (Fine if every node runs on this machine.)")


def optuna_storage(given: str | None, name: str, exp_dir: str) -> str:
    """Where the Optuna study lives: ``given`` (--optuna-storage), else a journal in the
    experiment directory, else (an experiment on object storage, where a file cannot be
    appended) beside the driver."""
    if given:
        return given
    if "://" in exp_dir:
        return str(Path(f"{name}.optuna.journal").resolve())
    return f"{exp_dir}/{OPTUNA_JOURNAL}"


def check_optuna_storage(storage: str, given: bool) -> None:
    """StorageError for an Optuna storage that cannot be opened: a journal path that is a
    directory or lies where no file can be made, an RDB URL of an unknown scheme, a SQLite file
    in a missing directory, a database that refuses the connection. An RDB is opened (which
    creates Optuna's tables in an empty database); a journal is only looked at."""
    flag = "--optuna-storage" if given else "the Optuna journal"
    if "://" not in storage:
        p = Path(storage)
        if p.is_dir():
            raise StorageError(f"{flag} {storage} is a directory: give a journal file path or an RDB URL")
        if p.exists():
            if not os.access(p, os.R_OK | os.W_OK):
                raise StorageError(f"{flag} {storage} cannot be read and written by this user")
            with open(p, "rb") as f:
                first = f.readline(JOURNAL_TAIL_BYTES)
            # (a first record cut off has no newline yet: repair_journal sets it aside)
            if first.endswith(b"\n") and not (_whole_record(first) and b'"op_code"' in first):
                raise StorageError(f"{storage} is not an Optuna journal: its first line is no Optuna record; give "
                                   f"another --optuna-storage, or restore the file")
        elif given:
            try:
                check_writable_dir(p.parent, f"{flag} {storage}: its directory")
            except ValueError as e:
                raise StorageError(str(e)) from None
        return

    try:
        url = make_url(storage)
        url.get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError):
        raise StorageError(f"{flag} {storage} is not an RDB URL Optuna can open (sqlite:///path, "
                           f"postgresql://..., mysql://...), nor a journal file path") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        directory = Path(url.database).parent
        if not directory.is_dir():
            raise StorageError(f"{flag} {storage}: the directory {directory} does not exist")
    try:
        open_storage(storage)
    except Exception as e:  # a driver missing, a server down, a file that is no database...
        raise StorageError(f"{flag} {storage} cannot be opened: {' '.join(str(e).split())[:300]}") from None


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """The Optuna storage object of ``optuna_storage``'s answer: an RDB URL or a journal file."""
    if "://" in storage:
        return optuna.storages.get_storage(storage)

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return ListedJournalStorage(JournalFileBackend(storage))


class ListedJournalStorage(optuna.storages.JournalStorage):
    """Optuna's journal storage, which lists a study's trials without looking at each of them.

    A study lists its trials twice at every ask: its waiting trials, then every trial (its cache,
    which the sampler reads). Optuna's journal looks up every trial and checks its state for each
    list: at 10,000 trials, in a driver whose heap the search has spread out, that took longer
    than the sampler's whole work on its window. A finished trial never changes (the journal
    rejects updates to it), so this keeps each study's list of trials, renews its unfinished ones
    and appends the new ones: a list costs a copy, and the unfinished trials are looked at alone."""

    _listed_from = None  # the journal's replay that the lists were made from

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in ("_listed_from", "_listed", "_unfinished"):
            state.pop(key, None)
        return state

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        with self._thread_lock:
            self._sync_with_backend()
            replay = self._replay_result
            if study_id not in replay._studies:
                raise KeyError(f"No study with id {study_id}.")
            if self._listed_from is not replay:  # (a new replay: unpickled, or a snapshot restored)
                self._listed_from, self._listed, self._unfinished = replay, {}, {}
            ids, trials = replay._study_id_to_trial_ids[study_id], replay._trials
            listed, unfinished = self._listed.setdefault(study_id, []), self._unfinished.setdefault(study_id, set())
            for number in list(unfinished):
                listed[number] = trials[ids[number]]
                if listed[number].state.is_finished():
                    unfinished.discard(number)
            for number in range(len(listed), len(ids)):
                listed.append(trials[ids[number]])
                if not listed[number].state.is_finished():
                    unfinished.add(number)
            if states is None:
                found = listed.copy()
            elif not any(state in states for state in FINISHED):
                found = [listed[n] for n in sorted(unfinished) if listed[n].state in states]
            else:
                found = [t for t in listed if t.state in states]
        # copied outside the lock: the journal replaces a trial it updates, never changes one in place
        return copy.deepcopy(found) if deepcopy else found


def existing_studies(storage: str) -> set[str]:
    """The names of the studies ``storage`` holds (none in a journal not written yet);
    StorageError for a file that is no Optuna journal."""
    if "://" not in storage and not Path(storage).exists():
        return set()

    try:
        return {s.study_name for s in optuna.study.get_all_study_summaries(open_storage(storage))}
    except (ValueError, KeyError, TypeError) as e:  # records that are not JSON, or not Optuna's
        raise StorageError(f"{storage} is not an Optuna journal newllm can read ({' '.join(str(e).split())[:200]}): "
                           f"give another --optuna-storage, or restore the file") from None


def repair_journal(path: str) -> Path | None:
    """Make the Optuna journal at ``path`` end on a whole record, so that what is appended next
    starts on a line of its own. A last record cut off mid-write is moved to
    ``<journal>.partial-<time>`` (returned) and cut from the journal; a whole last record that
    only lacks its newline gets it. Optuna's records are one JSON object a line; the repair holds
    Optuna's own lock on the file, as its writers do."""

    p = Path(path)
    if not p.is_file():
        return None
    lock = JournalFileSymlinkLock(str(p))
    lock.acquire()
    try:
        return _repair_tail(p)
    finally:
        lock.release()


def _repair_tail(p: Path) -> Path | None:
    with open(p, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = max(0, size - JOURNAL_TAIL_BYTES)
        f.seek(start)
        chunk = f.read()
        if chunk.endswith(b"\n"):
            return None
        cut = chunk.rfind(b"\n") + 1  # 0: no newline in the chunk
        if cut == 0 and start > 0:
            raise StorageError(f"the Optuna journal {p} ends in a line of over {JOURNAL_TAIL_BYTES} bytes: "
                               f"not a journal newllm can repair")
        tail = chunk[cut:]
        if _whole_record(tail):
            f.write(b"\n")
            return None
        aside = p.with_name(f"{p.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.write_bytes(tail)
        f.truncate(start + cut)
        f.flush()
        os.fsync(f.fileno())
    return aside


def _whole_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def fail_left_running(storage: optuna.storages.BaseStorage, name: str) -> None:
    """Mark FAIL the trials of study ``name`` that a killed driver left RUNNING, so that the
    sampler stops treating them as pending. The Tune trials behind them run on after the resume,
    and StudySearch gives Optuna their results then."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:  # a driver killed before it made the study
        return
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)


PRUNE_THREADS = 16  # trials pruned at once: on object storage each listing and deletion is a round trip


def prune_checkpoints(exp_dir: str) -> int:
    """Delete the checkpoints of finished trials except their first (after Phase 1) and their
    latest (the trials table's ``checkpoint_path``); return how many. Unfinished trials (an
    interrupted search) keep all theirs, one of which a resume will start from."""
    try:
        trials, _ = load(exp_dir)
    except FileNotFoundError:
        return 0
    # a trial's latest checkpoint is its last row's (one thread a trial directory)
    latest = {path.rsplit("/", 1)[0]: path for path in trials.checkpoint_path.dropna()}
    with ThreadPoolExecutor(PRUNE_THREADS) as pool:
        return sum(pool.map(lambda path: prune_trial(checkpoint_dir(exp_dir, path)), latest.values()))


def prune_trial(latest_checkpoint: str) -> int:
    """Delete the checkpoints beside ``latest_checkpoint`` but it and the first; return how many."""
    fs, latest = filesystem(latest_checkpoint)
    parent = latest.rsplit("/", 1)[0]
    checkpoints = sorted(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                         if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    deleted = [c for c in checkpoints[1:] if c != latest]
    for c in deleted:
        fs.delete_dir(c)
    return len(deleted)
