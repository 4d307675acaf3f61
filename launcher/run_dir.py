"""What a launch may do with a run directory that already holds a run.

A relaunch with ``checkpoint.resume=auto`` continues the run it finds, so it must be the
same run: a changed optimizer, model, data or seed would be trained on top of weights
and moments that came from another, and the log would read as one run. Settings meant
to change on resume (steps, LR schedule, eval, logging, checkpointing, parallelism) are
allowed and named in the log. ``checkpoint.resume=never`` starts over, which is safe
only in a directory without a run: otherwise the old checkpoints would sit beside the
new ones (and a later automatic relaunch would resume the old run), and the metrics and
TensorBoard events of the two would mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from launcher.checkpoint import find_latest
from launcher.config import Config, config_to_dict

#: Keys that make a run what it is: a relaunch that changes one resumes a different run.
#: Not among them: optim.lr (relaunching at a lower lr after a divergence is the fix the
#: divergence message suggests), and the policies that do not change the maths
#: (what to do with bad data or a non-finite step, stepping inside backward).
IDENTITY_SECTIONS = ("model", "data", "optim")
IDENTITY_KEYS = ("training.seed", "training.seq_len", "training.batch_size", "training.dtype")
NOT_IDENTITY = ("optim.lr", "optim.nonfinite", "optim.per_layer", "data.on_error")


def check_run_dir(cfg: Config) -> tuple[str | None, list[str]]:
    """(problem, changes): an error message if this launch must not use ``run.dir``,
    and the non-identity keys that differ from the run it resumes ("key old -> new")."""
    run_dir = Path(cfg.run.dir)
    latest = find_latest(run_dir / "ckpt")
    if cfg.checkpoint.resume == "never":
        held = [f"checkpoint {latest.name}"] if latest else []
        if (run_dir / "metrics.jsonl").exists():
            held.append("metrics.jsonl")
        if held:
            return (f"run.dir={cfg.run.dir} already holds a run ({', '.join(held)}); "
                    "checkpoint.resume=never would start a second one beside it, and a later "
                    "relaunch would resume the old one. Choose a new run.dir, or remove "
                    f"{cfg.run.dir} to start over", [])
        return None, []
    saved = run_dir / "config.yaml"
    if cfg.checkpoint.resume != "auto" or latest is None or not saved.is_file():
        return None, []  # nothing to resume, or an explicit checkpoint: a deliberate start
    old = _flat(yaml.safe_load(saved.read_text()) or {})
    new = _flat(config_to_dict(cfg))
    changed = [key for key in sorted(new) if key in old and old[key] != new[key]]
    identity = [key for key in changed if _is_identity(key)]
    if identity:
        what = "; ".join(f"{key}: {old[key]!r} -> {new[key]!r}" for key in identity)
        return (f"run.dir={cfg.run.dir} holds a run that this config would resume from "
                f"{latest.name}, but it changes what that run is ({what}). Keep these "
                "settings to resume it, or choose a new run.dir for a new run", [])
    return None, [f"{key} {old[key]!r} -> {new[key]!r}" for key in changed]


def _is_identity(key: str) -> bool:
    section = key.split(".", 1)[0]
    return key not in NOT_IDENTITY and (section in IDENTITY_SECTIONS or key in IDENTITY_KEYS)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """{"section.key": value} of a config dict (methods: presets are folded into optim)."""
    return {f"{section}.{key}": value for section, values in config.items()
            if section != "methods" and isinstance(values, dict)
            for key, value in values.items()}
