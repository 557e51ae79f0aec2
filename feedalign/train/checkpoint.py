"""Checkpoints: written atomically with a checksum, read with `weights_only=True`
(no pickle code runs) and verified before use.

A checkpoint holds everything an interrupted run needs to continue bit-identically
on CPU: model (with its feedback buffers), optimizer and schedule state, epoch and
batch position, the epoch's running sums and the RNG states.

On disk it is a small wrapper {"format", "sha256", "payload"}: `payload` holds the
bytes of `torch.save(checkpoint)` as a uint8 tensor and `sha256` their digest, so a
flipped bit anywhere in the payload stops a resume with the file's name instead of
continuing from silently different weights. Files without the wrapper (a state_dict
saved by `torch.save`, given to `-load`) are read as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import torch
from torch import nn

from feedalign.files import atomic_write

CHECKPOINT = "checkpoint.pt"
FORMAT = "feedalign-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint (or -load file) that is unreadable, corrupt, or of another network."""


def save(obj: dict, path: str | os.PathLike) -> None:
    """Write `obj` with its checksum; a reader sees the previous file or this one, never a mix."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    wrapper = {
        "format": FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    out = io.BytesIO()
    torch.save(wrapper, out)  # in memory: torch's file writer turns a full disk into a RuntimeError
    atomic_write(path, lambda f: f.write(out.getbuffer()))


def _torch_load(source, name: str | os.PathLike):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {name}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{name} is a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"{name} cannot be read (permission denied); give yourself read permission "
                              "on it (chmod u+r) or use a copy you can read") from None  # fmt: skip
    except OSError as err:
        if err.filename is not None:  # the OS refused the file itself: the CLI names it and the reason
            raise
        why = _why(err, source)  # torch's reader ran past the end of a cut file: an errno, no path
    except Exception as err:  # not torch's format, truncated, or holding code: say which file and why
        why = _why(err, source)
    raise CheckpointError(
        f"{name} is not a readable checkpoint (a file written by feedalign, or torch.save of a state_dict): "
        f"{why}"
    )


def _why(err: Exception, source) -> str:
    """The reason in the user's terms; torch's own text would suggest `weights_only=False`,
    which is exactly what must not be done with a file of unknown origin."""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:4]
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    if not head:
        return "it is empty (0 bytes: a copy or a write that did not finish); use an intact copy"
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
    if found:
        return f"it holds Python objects ({found.group(1)}), not only tensors; feedalign does not load those"
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return "it is not in torch.save's format"
    return "torch.save's archive in it is damaged (truncated or corrupted); use an intact copy"


def load(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`, its checksum verified (CheckpointError if it differs)."""
    obj = _torch_load(path, path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        return obj  # a plain torch.save'd file (-load), or a checkpoint from before checksums
    payload = obj["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != obj["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch, the file changed after feedalign wrote it (disk or copy "
            "error). It cannot be trusted: restore it from a copy, or start the run again"
        )
    return _torch_load(io.BytesIO(payload), path)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_same_network(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """Refuse weights of a different network, naming the mismatching entries and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys()
              if getattr(state[k], "shape", None) != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} holds weights of a different network (check -network, -num_layers, "
            f"-num_hidden, -gradient, -dataset): missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]}"
        )


def load_weights(model: nn.Module, path: str | Path) -> None:
    """`-load FILE`: a state_dict or a feedalign checkpoint; a different network is
    refused with the mismatching names and shapes."""
    obj = load(Path(path))
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict (found {type(state).__name__})")
    check_same_network(model, state, path)
    model.load_state_dict(state)
