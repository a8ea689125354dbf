"""Inspect and decode untrusted media in a short-lived child process with memory and time limits.

Why a child: decoders (decord, PIL, ffmpeg) are C code that believes container headers. A crafted 4 KB mp4
makes decord allocate ~51 GB and abort; a 108-byte GIF declares a 16000x16000 canvas. In a child that is one
refused input with a message naming the field; in the API process it would be the whole service, in a
worker its loaded model (and a job re-queued onto the next worker to die the same way).

The child (`python -m vace_local.core.media_vet`) caps its own address space and CPU time before it imports a
decoder: setting limits from a `preexec_fn` is not safe in a threaded parent (the API's event loop, the
worker's heartbeat thread). The parent enforces the wall-clock limit by killing it. The API uses
`vet_file_async` (it never blocks the event loop, nor a thread); workers and the CLI use `vet_inputs`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vace_local.core.errors import InputError, JobCancelled
from vace_local.core.events import CancelFn, never_cancel
from vace_local.core.inputs import input_refs
from vace_local.core.media_limits import MediaFacts, MediaLimits
from vace_local.core.spec import MediaInputs
from vace_local.core.spec import MediaKind as Kind

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _command(path: Path, field: str, kind: Kind, decode: bool, limits: MediaLimits) -> list[str]:
    return [sys.executable, "-m", "vace_local.core.media_vet", kind, field, str(path), "1" if decode else "0",
            json.dumps(asdict(limits))]


def _child_env() -> dict[str, str]:
    """This package first on the path (the child runs the same code), and few threads: every thread's stack
    and malloc arena count against the address-space limit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    return env


def _verdict(field: str, decode: bool, limits: MediaLimits, returncode: int | None, stdout: bytes,
             stderr: bytes, timed_out: bool) -> MediaFacts:
    """The child's answer as facts, or an InputError naming the field (a crash or a timeout included)."""
    verb = "could not be decoded" if decode else "could not be read"
    if timed_out:
        raise InputError(field, f"{verb}: inspecting it took longer than {limits.timeout_s:g} s "
                         "(VACE_MEDIA_TIMEOUT_S)")
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    if returncode == 0 and lines:
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            answer = {}
        if "facts" in answer:
            return MediaFacts(**answer["facts"])
        if "refused" in answer:
            raise InputError(field, answer["refused"])
        if "failed" in answer:
            raise InputError(field, f"{verb}: {answer['failed']}")
    err = stderr.decode("utf-8", "replace")
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    if "bad_alloc" in err or "MemoryError" in err or "Cannot allocate memory" in err:
        why = f"the decoder ran out of its {limits.memory_mb} MB memory limit (VACE_MEDIA_MEMORY_MB)"
    elif returncode == -signal.SIGXCPU:
        why = f"the decoder used more than {limits.timeout_s:g} s of CPU (VACE_MEDIA_TIMEOUT_S)"
    else:
        why = "the decoder crashed"
    raise InputError(field, f"{verb}: {why} ({how}); the file is damaged or crafted")


def vet_file(path: str | Path, field: str, kind: Kind, *, decode: bool = True, limits: MediaLimits | None = None,
             should_cancel: CancelFn = never_cancel) -> MediaFacts:
    """Check one file's declared sizes and (with `decode`) decode all of it in a limited child; blocking."""
    limits = limits or MediaLimits.from_env()
    proc = subprocess.Popen(_command(Path(path), field, kind, decode, limits), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
    deadline = time.monotonic() + limits.timeout_s
    while True:
        try:
            out, err = proc.communicate(timeout=0.25)
            return _verdict(field, decode, limits, proc.returncode, out, err, timed_out=False)
        except subprocess.TimeoutExpired:
            cancelled = should_cancel()
            if cancelled or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                if cancelled:
                    raise JobCancelled("cancelled while checking the inputs") from None
                return _verdict(field, decode, limits, proc.returncode, out, err, timed_out=True)


async def vet_file_async(path: str | Path, field: str, kind: Kind, *, decode: bool = False,
                         limits: MediaLimits | None = None) -> MediaFacts:
    """`vet_file` for the event loop: awaits the child without blocking the loop or holding a thread."""
    limits = limits or MediaLimits.from_env()
    proc = await asyncio.create_subprocess_exec(
        *_command(Path(path), field, kind, decode, limits), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=limits.timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return _verdict(field, decode, limits, proc.returncode, b"", b"", timed_out=True)
    except asyncio.CancelledError:  # the client went away: do not leave the child running
        proc.kill()
        raise
    return _verdict(field, decode, limits, proc.returncode, out, err, timed_out=False)


def vet_inputs(resolved: MediaInputs, *, limits: MediaLimits | None = None,
               should_cancel: CancelFn = never_cancel) -> None:
    """Vet and fully decode every local input of a job (`ResolvedInputs` or `JobInputs` of local paths) in
    the sandbox before the process that holds the model decodes any of them. Errors name the input field."""
    limits = limits or MediaLimits.from_env()
    for ref in input_refs(resolved):
        vet_file(ref.value, ref.label, ref.kind, decode=True, limits=limits, should_cancel=should_cancel)
