"""`crate compare`: do two models (CRATE and GPT, or two seeds of one) learn the same thing?

    result, status = compare_files({"crate": dir, "gpt": dir}, data_dir, "compare", CompareConfig())

Everything is checked before any work (the output folder is ours, the data and every model's tokenizer agree, the
models share a vocabulary, the splits are long enough); then, on the first `tokens` of the val split:

    CKA         every pair of models, every pair of layers, residual stream and neurons, unbiased and biased
    stitching   every model into itself, every pair both ways, and a random-initialised copy of each source
    trajectory  (with a run folder) each layer at each grid checkpoint against its final state

The folder's stamp (crate.provenance) holds the identity of all of it: a rerun with the same inputs reuses the
results and says so, one with other inputs is refused, naming the differences, unless `overwrite`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from crate.errors import CrateError
from crate.eval.compare.stitch import StitchConfig

Status = Literal["computed", "reused"]


@dataclass
class CompareConfig:
    tokens: int = 8192  # held-out tokens from the start of the val split
    seq_len: int = 256  # context of each sequence (at most the smallest model's)
    cka_batch: int = 1024  # tokens per CKA minibatch (whole sequences)
    stitch: StitchConfig | None = field(default_factory=StitchConfig)  # None: no stitching
    seed: int = 0  # stitching's training windows and the random-init control
    device: str | None = None  # None: cuda when available

    def validate(self) -> None:
        counts = {"--tokens": self.tokens, "--seq-len": self.seq_len, "--cka-batch": self.cka_batch,
                  **({"--stitch-steps": self.stitch.steps, "stitch batch": self.stitch.batch} if self.stitch else {})}
        bad = [f"{k} {v}" for k, v in counts.items() if v < 1]
        if bad:
            raise CrateError(f"crate compare: {', '.join(bad)}: every count must be at least 1")

    def identity(self) -> dict[str, Any]:
        """The settings the results depend on (the device is how, not what)."""
        return {k: v for k, v in asdict(self).items() if k != "device"}


def compare_files(checkpoints: dict[str, str], data_dir: str | Path, out: str | Path, cfg: CompareConfig,
                  trajectory: str | Path | None = None, overwrite: bool = False) -> tuple[dict[str, Any], Status]:
    """Check, then reuse or compute and write the comparison into `out`; (the result, "computed" or "reused")."""
    import torch

    from crate.datadir import read_manifest
    from crate.eval.compare.inputs import (
        check_trajectory, grid_checkpoints, identity, load_models, tokens_identity,
    )
    from crate.eval.compare.outputs import RESULT
    from crate.eval.compare.similarity import minibatches, sequences
    from crate.eval.models import checkpoint_fields
    from crate.eval.progress import say
    from crate.provenance import check_owned, check_stamp, refuse
    from crate.train.data import open_split

    cfg.validate()
    out = Path(out)
    check_owned(out, "another --out")
    if len(checkpoints) == 1 or not (checkpoints or trajectory):
        raise CrateError(f"crate compare compares two or more checkpoints (-c crate=DIR gpt=DIR), got "
                         f"{len(checkpoints) or 'none'}; --trajectory RUN alone needs no -c")
    manifest = read_manifest(data_dir)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(checkpoints, manifest, data_dir, device)
    points, final = grid_checkpoints(trajectory) if trajectory else ({}, None)
    blocks = [m.config.block_size for m in models.values()]
    if trajectory:
        blocks.append(check_trajectory(points, final, manifest, data_dir))
    seq_len = min(cfg.seq_len, *blocks)
    seqs = sequences(open_split(data_dir, "val"), cfg.tokens, seq_len)
    batches = minibatches(seqs, cfg.cka_batch)
    stitching = cfg.stitch is not None and len(models) > 1
    train = open_split(data_dir, "train") if stitching else None
    if train is not None and len(train) < seq_len:
        raise CrateError(f"{data_dir}: the train split has {len(train)} tokens, fewer than one sequence of {seq_len}; "
                         f"stitching trains on it: pass --no-stitch, or a smaller --seq-len")
    ident = identity(models, tokens_identity(seqs, manifest), cfg.identity(), points or None, final)
    status, diffs = check_stamp(out, ident)
    if status == "reuse" and (out / RESULT).is_file():
        say(f"{out}: reused (same models, tokens and settings); pass another --out to keep both")
        return json.loads((out / RESULT).read_text()), "reused"
    if status == "stale" and not overwrite:
        refuse("a comparison", out, diffs, "--overwrite")
    result = compute(models, seqs, batches, train, cfg, points, final, device)
    result["models"] = {n: {"checkpoint": checkpoint_fields(c)["checkpoint"], "arch": models[n].config.arch,
                            "n_layer": models[n].config.n_layer, "n_embd": models[n].config.n_embd,
                            "n_neurons": int(models[n].n_neurons), "identity": ident["models"][n]}
                        for n, c in checkpoints.items()}
    result["data"] = {"dir": str(Path(data_dir).resolve()), "split": "val", **ident["data"]}
    write(result, out, ident)
    return result, "computed"


def compute(models: dict[str, Any], seqs: Any, batches: list[Any], train: Any, cfg: CompareConfig,
            points: dict[int, Path], final: Path | None, device: str) -> dict[str, Any]:
    """The numbers: CKA of every pair, the stitching penalties, the trajectory; with a progress bar each."""
    from crate.eval.compare.inputs import VERSION
    from crate.eval.compare.penalties import n_steps, stitch_penalties
    from crate.eval.compare.similarity import cka_pairs
    from crate.eval.compare.trajectory import trajectory_cka
    from crate.eval.progress import Progress

    progress = Progress(enabled=True)
    seq_len = int(seqs.shape[1])
    result: dict[str, Any] = {
        "version": VERSION, "cka": [], "stitch": None, "trajectory": None,
        "settings": {**cfg.identity(), "seq_len": seq_len, "n_tokens": int(seqs.numel()), "device": device,
                     "minibatch_tokens": int(batches[0].numel()), "n_minibatches": len(batches)}}
    try:
        pairs = list(combinations(models, 2))
        if pairs:
            done = _counter(progress, "CKA", len(batches), "minibatches")
            cka = cka_pairs(models, pairs, batches, done)
            result["cka"] = [{"a": a, "b": b, "same_arch": models[a].config.arch == models[b].config.arch,
                              **{kind: {e: m.tolist() for e, m in by.items()} for kind, by in cka[a, b].items()}}
                             for a, b in pairs]
        if train is not None and cfg.stitch is not None:
            val = [seqs[k:k + cfg.stitch.batch].to(device) for k in range(0, len(seqs), cfg.stitch.batch)]
            done = _counter(progress, "stitching", n_steps(models, cfg.stitch), "steps")
            result["stitch"] = stitch_penalties(models, train, val, seq_len, cfg.stitch, cfg.seed, done)
        if points and final is not None:
            done = _counter(progress, "trajectory", len(points) * len(batches), "minibatches")
            result["trajectory"] = trajectory_cka(points, final, batches, device, done)
    finally:
        progress.close()
    return result


def _counter(progress: Any, desc: str, total: int, unit: str) -> Any:
    """A tick function advancing task `desc` by one (its clock starts now)."""
    state = {"done": 0}
    progress.begin(desc, 0, total, unit)

    def tick() -> None:
        state["done"] += 1
        progress.update(desc, state["done"], total, unit)

    return tick


def write(result: dict[str, Any], out: Path, ident: dict[str, Any]) -> None:
    """Claim the folder, drop the stamp and files of an earlier comparison (only those it listed as its own), write,
    and stamp last: an interrupted write leaves no stamp, so the rerun computes again."""
    from crate.eval.compare.outputs import RESULT, write_outputs
    from crate.eval.progress import say
    from crate.provenance import STAMP, claim, write_stamp

    claim(out)
    (out / STAMP).unlink(missing_ok=True)
    try:
        old = json.loads((out / RESULT).read_text()).get("files") or []
    except (OSError, ValueError, AttributeError):
        old = []
    for name in old:
        if isinstance(name, str) and name == Path(name).name:
            (out / name).unlink(missing_ok=True)
    files = write_outputs(result, out)
    write_stamp(out, "compare", ident)
    say(f"wrote {out}/ ({', '.join(files)})")


__all__ = ["CompareConfig", "compare_files", "compute", "write"]
