"""Checkpoints: written atomically, read with `weights_only=True` (no pickle code runs).

A checkpoint holds everything an interrupted run needs to continue bit-identically
on CPU: model (with its feedback buffers), optimizer and schedule state, epoch and
batch position, the epoch's running sums and the RNG states.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from feedalign.train.config import OptionError

CHECKPOINT = "checkpoint.pt"


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    except Exception as err:  # corrupt or foreign file: say which and why
        raise OptionError(f"{path} is not a readable feedalign checkpoint: {err}") from err


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """`-load FILE`: a state_dict or a feedalign checkpoint; a different network is
    refused with the mismatching names and shapes."""
    obj = load(Path(path))
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise OptionError(f"{path} holds no state_dict (found {type(state).__name__})")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise OptionError(
            f"{path} holds weights of a different network (check -network, -num_layers, "
            f"-num_hidden, -gradient, -dataset): missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state)
