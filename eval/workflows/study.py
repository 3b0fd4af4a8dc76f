"""`crate study`: the paper's claim at CPU scale. CRATE against GPT (and GPT-SAE) at the paper's 1L, 2L and 3L shapes,
each trained with several seeds on the embedded corpus, every neuron scored, and a verdict per claim read from
intervals that include the training-seed noise (crate.eval.report.study).

    <out>/data/                                     the embedded corpus with a small BPE, prepared once
    <out>/runs/seed<k>/<arch>-<size>/               one training run per (seed, size, arch); GPT's SAEs in its sae/
    <out>/interpret/seed<k>/<size>/<system>/        every neuron (every live SAE latent), token-statistics scorer,
                                                    detection and fuzzing
    <out>/interpret/seed<k>/<size>/<arch>-control/  a seeded sample of a random-initialised CRATE's or GPT's neurons
    <out>/interpret-smollm2/seed0/<size>/<arch>/     a seeded sample through the embedded SmolLM2 (first seed only)
    <out>/curves/seed<k>/<size>/<arch>/step-<N>/     a neuron sample of each grid checkpoint (runs' grid/), scored:
                                                    the matched-loss reading (crate.eval.stats.matched)
    <out>/timings.json                              seconds each (seed, size) took when it was computed, and the
                                                    study's wall time (summed over the invocations that computed)
    <out>/index.md ...                              the report (crate.eval.report.study), rewritten every time

Every step goes through the pipelines' steps (crate.eval.workflows.steps), so each output carries its provenance: a rerun
reuses what matches exactly, resumes what was interrupted and refuses outputs of other inputs (`--overwrite`
discards them). Runs go seed by seed, so a study stopped early still has whole seeds. The (seed, size) units run
in `jobs` processes at once (default 2 on 2 cores or more, each with its share of the torch threads): scoring with
the token-statistics backend is single-threaded Python, so one process leaves a core idle. Records are kept in
each folder's records/<layer>/cache.npz only (no NeuronRecord JSON per neuron: `crate interpret` of the same
checkpoint writes them).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crate.errors import CrateError, PipelineError
from crate.eval.report.study_layout import (
    DEFAULT_GRID, curve_dir, eval_offset, eval_slices, grid_size, grid_steps, interpret_dir, run_dir,
)
from crate.eval.workflows.lock import folder_lock
from crate.eval.workflows.steps import (
    ARCHS, CPU_SAE, interpret_model, log, matched_overrides, prepare_data, quiet, train_model, train_saes,
)
from crate.tokenizer import padded_vocab
from crate.train.grid import grid_point

STUDY_SIZES = ("1L", "2L", "3L")
MATCHES = ("params", "width")
# Per run: 200 steps of 32 x 64 tokens (410k tokens, about 1/3 of the corpus) at the demo's rates.
STUDY_TRAIN = {"batch_size": 32, "micro_batch_size": 32, "lr": 3e-3, "min_lr": 3e-4, "val_batches": 4,
               "final_val_batches": 8}


@dataclass
class StudyOptions:
    out: Path = Path("crate-study")
    sizes: list[str] = field(default_factory=lambda: list(STUDY_SIZES))
    seeds: int = 3  # training seeds per (size, arch): train.seed = 1337 + k
    steps: int = 200
    protocols: list[str] = field(default_factory=lambda: ["tar"])
    context: int = 64
    vocab_size: int = 512
    match: str = "params"  # "params": CRATE's dictionary widened to GPT's count; "width": h = 4d for both (the paper's)
    sae: bool = True
    neurons: int | None = None  # per layer; None: every neuron
    control_neurons: int | None = 64  # random-init controls, per layer; 0: none, None: every neuron
    llm_neurons: int = 4  # per layer through SmolLM2, first seed only, TaR (the scorer-agreement units); 0: none
    n_tokens: int = 16 * 1024  # validation tokens recorded per model: training seed k's from token k x n_tokens
    interpret_seed: int = 0  # + k for training seed k: its neuron samples, random records and control init
    n_boot: int = 2000
    overrides: list[str] = field(default_factory=list)  # model.* / train.* for every run (YAML values)
    max_documents: int | None = None
    overwrite: bool = False
    jobs: int | None = None  # (seed, size) units run at once; None: 2 when the machine has 2 cores or more
    # checkpoints per run (every steps / grid steps, the last the final model) for matched loss; 0: none; None: the
    # largest number up to 8 that divides steps
    grid: int | None = None
    curve_neurons: int = 32  # per layer, scored at every grid checkpoint (the same sample for every point)
    margin: float = 5.0  # x100 score points: the equivalence margin of the mean-score claims (TOST)


def default_jobs() -> int:
    import os

    return 2 if (os.cpu_count() or 1) >= 2 else 1


@dataclass
class Unit:
    """One (seed, size): both archs trained, GPT's SAEs, and every system scored."""

    seed: int
    size: str
    recipes: dict[str, dict[str, Any]]
    params: dict[str, int]
    n_layer: int
    n_hidden: dict[str, int]  # per arch, as built (CRATE's dictionary width, GPT's MLP width)

    @property
    def name(self) -> str:
        return f"seed{self.seed}/{self.size}"


def build_units(opts: StudyOptions, data_dir: Path, vocab: int) -> list[Unit]:
    """Every run's recipe, overrides applied and every key checked (RunConfig) before anything runs."""
    from crate.config import PRESETS
    from crate.train.config import ConfigError, RunConfig, apply_overrides

    if opts.match not in MATCHES:
        raise CrateError(f"--match {opts.match!r}: use one of {', '.join(MATCHES)}")
    if not isinstance(opts.seeds, int) or opts.seeds < 1:
        raise CrateError(f"--seeds must be an integer >= 1, got {opts.seeds!r}")
    bad = [s for s in opts.sizes if s not in PRESETS]
    if bad or not opts.sizes:
        raise CrateError(f"unknown size(s) {', '.join(bad) or '(none given)'}: use presets among {', '.join(PRESETS)} "
                         f"(the study's are {', '.join(STUDY_SIZES)})")
    bad_grid = opts.grid is not None and (not isinstance(opts.grid, int) or opts.grid < 0
                                          or bool(opts.grid) and opts.steps % opts.grid)
    if bad_grid:
        raise CrateError(f"--grid {opts.grid!r}: the grid's points are every steps / grid steps, so it must divide "
                         f"--steps {opts.steps} (or be 0: no matched-loss reading; leave it out for the largest up to "
                         f"{DEFAULT_GRID} that does)")
    grid = grid_size(opts.steps, opts.grid)
    every = opts.steps // grid if grid else max(1, opts.steps // 4)
    train = {**STUDY_TRAIN, "max_steps": opts.steps, "context": opts.context,
             "warmup_steps": max(1, min(50, opts.steps // 10)), "val_every": every,
             "grid_every": every if grid else 0, "ckpt_every": opts.steps}
    base = apply_overrides({"model": {}, "train": train}, opts.overrides)
    extra = set(base) - {"model", "train"}
    if extra:
        raise ConfigError(f"study overrides take model.* and train.* keys only, not {', '.join(sorted(extra))}")
    shape = {k: v for k, v in base["model"].items() if k not in ("arch", "preset")}
    if "n_hidden" in shape and opts.match == "params":
        raise ConfigError("model.n_hidden with --match params: the study chooses CRATE's n_hidden to match GPT's "
                          "parameter count; use --match width to set it for both")
    for key in ("arch", "preset", "vocab_size", "block_size"):
        if key in base["model"]:
            raise ConfigError(f"model.{key} is set by the study (--sizes, --context, --vocab-size); leave it out")
    data = {"path": str(data_dir), "source": "embedded", "tokenizer": "bpe", "vocab_size": opts.vocab_size}
    if opts.max_documents:
        data["max_documents"] = opts.max_documents
    units = []
    for seed in range(opts.seeds):
        for size in opts.sizes:
            if opts.match == "params":
                crate_over, gpt_over, _, _ = matched_overrides(size, vocab, opts.context, **shape)
            else:
                crate_over = gpt_over = {"vocab_size": vocab, "block_size": opts.context, **shape}
            recipes, params, configs = {}, {}, {}
            for arch, over in (("crate", crate_over), ("gpt", gpt_over)):
                raw = {"model": {"arch": arch, "preset": size, **over}, "data": dict(data),
                       "train": {**base["train"], "seed": 1337 + seed}}
                RunConfig.from_dict({"name": f"{arch}-{size}", **raw})
                recipes[arch] = raw
                params[arch], configs[arch] = _built(raw["model"])
            units.append(Unit(seed, size, recipes, params, configs["gpt"].n_layer,
                              {arch: c.n_hidden for arch, c in configs.items()}))
    return units


def _built(model: dict[str, Any]) -> tuple[int, Any]:
    """The parameter count and resolved config of a recipe's model (built on the meta device: no memory)."""
    import torch

    from crate import build_model

    with torch.device("meta"):
        m = build_model(model["arch"], model["preset"], **{k: v for k, v in model.items() if k not in ("arch", "preset")})
        return m.num_params(), m.config


def preflight(opts: StudyOptions) -> list[str]:
    """Every problem that can be found before the first step, as messages ([] when there is none)."""
    from crate.eval.autointerp.protocols import get_protocol

    problems: list[str] = []
    try:
        build_units(opts, Path(opts.out) / "data", padded_vocab(opts.vocab_size))
    except CrateError as e:
        problems.append(str(e))
    for p in opts.protocols:
        try:
            get_protocol(p)
        except CrateError as e:
            problems.append(f"protocol {p!r}: {e}")
    for name, value, low in (("--steps", opts.steps, 1), ("--context", opts.context, 8), ("--tokens", opts.n_tokens, 1),
                             ("--llm-neurons", opts.llm_neurons, 0), ("--boot", opts.n_boot, 100),
                             ("--jobs", opts.jobs if opts.jobs is not None else 1, 1),
                             ("--curve-neurons", opts.curve_neurons, 1)):
        if not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("--neurons", opts.neurons), ("--control-neurons", opts.control_neurons)):
        if value is not None and (not isinstance(value, int) or value < (1 if name == "--neurons" else 0)):
            problems.append(f"{name} must be a positive integer (or all), got {value!r}")
    if not isinstance(opts.margin, (int, float)) or not 0 < opts.margin < float("inf"):
        problems.append(f"--margin must be a finite number of score points > 0, got {opts.margin!r}")
    if opts.sae and importlib.util.find_spec("sae_lens") is None:
        problems.append('GPT-SAE needs SAELens: pip install -e ".[sae]", or pass --no-sae')
    if opts.llm_neurons:
        from crate.eval.llm.registry import check_llm

        try:
            check_llm("smollm2")
        except CrateError as e:
            problems.append(f"{e} (or pass --llm-neurons 0)")
    return problems


class Clock:
    """The study's ETA: seconds per layer of the (seed, size) units computed so far, times the layers left, over the
    units running at once. Units that were reused do not enter the rate."""

    def __init__(self, units: list[Unit], jobs: int = 1):
        self.jobs = jobs
        self.left = {u.name: u.n_layer for u in units}
        self.seconds = 0.0
        self.layers = 0

    def done(self, unit: Unit, seconds: float, reused: bool) -> str:
        layers = self.left.pop(unit.name)
        if not reused:
            self.seconds += seconds
            self.layers += layers
        todo = sum(self.left.values())
        if not todo:
            return "study: all runs done"
        if not self.layers:
            return f"study: {len(self.left)} runs to go"
        eta = self.seconds / self.layers * todo / min(self.jobs, len(self.left))
        return f"study: {len(self.left)} runs to go, ETA {eta / 60:.1f} min"


def _outputs(opts: StudyOptions, unit: Unit) -> list[Path]:
    """What a finished unit leaves (with `unit_inputs`, what tells a reused unit from a computed one)."""
    from crate.eval.autointerp.protocols import get_protocol

    out = Path(opts.out)
    paths = [run_dir(out, unit.seed, unit.size, arch) / "final" / "config.json" for arch in ARCHS]
    folders = [interpret_dir(out, unit.seed, unit.size, system) for system in _systems(opts)]
    if opts.control_neurons != 0:
        folders += [interpret_dir(out, unit.seed, unit.size, f"{arch}-control") for arch in ARCHS]
    for folder in folders:
        paths += [folder / "scores" / get_protocol(p).name / ".provenance.json" for p in opts.protocols]
    if unit.seed == 0 and opts.llm_neurons:
        paths += [interpret_dir(out, 0, unit.size, arch, llm=True) / "summary.json" for arch in ARCHS]
    paths += [d / "scores" / get_protocol(p).name / ".provenance.json" for d in _curve_dirs(opts, unit).values()
              for p in opts.protocols]
    return paths


def _curve_dirs(opts: StudyOptions, unit: Unit) -> dict[tuple[str, int], Path]:
    """{(arch, step): folder} of a unit's scored grid checkpoints."""
    return {(arch, step): curve_dir(Path(opts.out), unit.seed, unit.size, arch, step)
            for arch in ARCHS for step in grid_steps(opts.steps, opts.grid)}


def _systems(opts: StudyOptions) -> list[str]:
    return [*ARCHS, *(["gpt-sae"] if opts.sae else [])]


def run_unit(opts: StudyOptions, unit: Unit, data_dir: Path, t0: float) -> None:
    """Train both archs of one (seed, size), GPT's SAEs, and score every system (trained, control, LLM sample)."""
    from crate.eval.autointerp.protocols import get_protocol
    from crate.train.data import open_split

    out = Path(opts.out)
    system = {"devices": 1, "wandb": "off", "progress_bar": False}
    checkpoints: dict[str, str] = {}
    for arch in ARCHS:
        raw = unit.recipes[arch]
        final = train_model(f"{arch}-{unit.size} seed {unit.seed}", raw["model"], raw["data"], raw["train"],
                            run_dir(out, unit.seed, unit.size, arch), t0, system=system, overwrite=opts.overwrite)
        checkpoints[arch] = str(final)
    if opts.sae:
        checkpoints["gpt-sae"] = train_saes(Path(checkpoints["gpt"]), data_dir, t0, opts.overwrite, seed=unit.seed,
                                            seq_len=opts.context, **CPU_SAE)
    common = dict(explainer="stats", simulator="stats", seq_len=opts.context, n_tokens=opts.n_tokens,
                  token_offset=eval_offset(unit.seed, opts.n_tokens, len(open_split(data_dir, "val"))),
                  seed=opts.interpret_seed + unit.seed, batch_size=32, n_boot=opts.n_boot, write_json=False,
                  overwrite=opts.overwrite)
    for name, ckpt in checkpoints.items():
        label = f"{name}-{unit.size} seed {unit.seed}"
        for protocol in opts.protocols:
            interpret_model(label, ckpt, data_dir, interpret_dir(out, unit.seed, unit.size, name), protocol, t0,
                            neurons=opts.neurons, validity=True, **common)
            if opts.control_neurons != 0 and name in ARCHS:  # an SAE on a random GPT: not a control of GPT-SAE
                # one random init per training seed: the interpretation seed also seeds the control's init
                interpret_model(f"{label} (random init)", ckpt, data_dir,
                                interpret_dir(out, unit.seed, unit.size, f"{name}-control"), protocol, t0,
                                **{**common, "neurons": opts.control_neurons, "control": True})
    for (arch, step), folder in _curve_dirs(opts, unit).items():  # the same neuron sample at every point
        point = grid_point(run_dir(out, unit.seed, unit.size, arch), step)
        for protocol in opts.protocols:
            # the curves read the correlation only: no detection or fuzzing, and no quantile records where the
            # protocol scores none (their recording pass was over half of a point's time)
            interpret_model(f"{arch}-{unit.size} seed {unit.seed} at step {step}", str(point), data_dir, folder,
                            protocol, t0, **{**common, "neurons": opts.curve_neurons, "extra_scores": False,
                                             **({} if get_protocol(protocol).quantiles else {"per_bin": 0})})
    if unit.seed == 0 and opts.llm_neurons:
        for arch in ARCHS:
            # the LLM's planted units (written at layer 0) are checked at the first size only: at the others they
            # would repeat the same check in another host model, at most of the LLM sample's cost
            interpret_model(f"{arch}-{unit.size} seed 0 (SmolLM2)", checkpoints[arch], data_dir,
                            interpret_dir(out, 0, unit.size, arch, llm=True), "tar", t0,
                            validity=unit.size == opts.sizes[0],
                            **{**common, "explainer": "smollm2", "simulator": "smollm2", "neurons": opts.llm_neurons})


_WORKER_LOCK: list[Any] = []  # a worker's share of the study folder's lock, held until the worker exits


def _worker_init(parent: int, out: str) -> None:
    """A worker process holds its share of the study's lock (a rerun is refused while it lives) and exits when the
    study process dies."""
    from crate.eval.workflows.lock import join_lock, watch_parent

    _WORKER_LOCK.append(join_lock(Path(out)))
    watch_parent(parent)


def _unit_worker(opts: StudyOptions, unit: Unit, data_dir: Path, t0: float, threads: int) -> float:
    """One unit in a worker process (spawned: a fresh interpreter), with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    quiet()
    start = time.perf_counter()
    run_unit(opts, unit, data_dir, t0)
    return time.perf_counter() - start


def unit_inputs(opts: StudyOptions) -> str:
    """A digest of the options that shape a unit's outputs (not where they go, how many run at once, --overwrite, or
    the margin, which only the report reads)."""
    from dataclasses import asdict

    from crate.provenance import digest

    return digest({k: v for k, v in asdict(opts).items() if k not in ("out", "jobs", "overwrite", "margin")})


def _run_units(opts: StudyOptions, units: list[Unit], data_dir: Path, t0: float, jobs: int, reused: dict[str, bool]):
    """(unit, seconds, reused[unit]) as each unit finishes: in this process when `jobs` is 1, else in `jobs` worker
    processes. After a failure no new unit starts, the units running finish (their work is kept) and the first
    failure is raised; on Ctrl-C (which the workers get too: each keeps what it finished) the workers are stopped."""
    if jobs == 1:
        for unit in units:
            start = time.perf_counter()
            run_unit(opts, unit, data_dir, t0)
            yield unit, time.perf_counter() - start, reused[unit.name]
        return
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(), str(opts.out)))
    futures: dict[Any, Unit] = {}
    try:
        # seed by seed, the deepest size first: the last unit to finish is then a short one (no idle core at the end)
        order = sorted(units, key=lambda u: (u.seed, -u.n_layer))
        futures = {pool.submit(_unit_worker, opts, u, data_dir, t0, threads): u for u in order}
        pending, failure = set(futures), None
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=lambda f: units.index(futures[f])):
                if f.cancelled():
                    continue
                if f.exception() is not None:
                    if failure is None:
                        failure = f.exception()
                        for other in pending:
                            other.cancel()
                    continue
                yield futures[f], f.result(), reused[futures[f].name]
        if failure is not None:
            raise failure
    except BaseException as e:
        for f in futures:
            f.cancel()
        if isinstance(e, KeyboardInterrupt):  # the workers got the signal too: let them save what they finished
            wait([f for f in futures if not f.done()], timeout=60)
        for p in list(getattr(pool, "_processes", {}).values()):  # never wait for the units still queued
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def study(opts: StudyOptions, command: str | None = None) -> Path:
    """Run (or resume) the whole study and write its report; returns <out>/index.md. One study runs in a folder at
    a time (a lock that its workers hold too)."""
    from crate.provenance import check_owned, claim

    t0 = time.perf_counter()
    out = Path(opts.out)
    check_owned(out, "another --out")
    problems = preflight(opts)
    if problems:
        raise PipelineError("the study cannot run; nothing was done:\n  - " + "\n  - ".join(problems))
    claim(out)
    with folder_lock(out, "crate study"):
        return _study(opts, out, command, t0)


def _study(opts: StudyOptions, out: Path, command: str | None, t0: float) -> Path:
    import torch

    from crate.datadir import read_manifest

    quiet()
    log(f"crate study: sizes {', '.join(opts.sizes)} x {opts.seeds} training seeds x CRATE, GPT"
        f"{', GPT-SAE' if opts.sae else ''}; {opts.steps} steps each; protocols {', '.join(opts.protocols)}; "
        f"{torch.get_num_threads()} CPU threads; output in {out}", t0)
    data_dir = prepare_data("embedded", out / "data", "bpe", opts.vocab_size, t0, opts.max_documents, opts.overwrite)
    units = build_units(opts, data_dir, padded_vocab(read_manifest(data_dir)["vocab_size"]))
    for u in units[: len(opts.sizes)]:
        log(f"{u.size}: CRATE {u.params['crate']:,} parameters (n_hidden {u.n_hidden['crate']}) "
            f"vs GPT {u.params['gpt']:,} ({100 * (u.params['crate'] - u.params['gpt']) / u.params['gpt']:+.1f}%)", t0)
    from crate.train.data import open_split

    split = len(open_split(data_dir, "val"))
    slices = eval_slices(opts.n_tokens, split)
    log(f"evaluation tokens: each training seed k reads its own {opts.n_tokens:,} of the {split:,}-token validation "
        f"split, from token k x {opts.n_tokens:,}" + (f"; the split holds {slices} such slices, so seeds k and k + "
                                                     f"{slices} read the same tokens" if slices < opts.seeds else ""), t0)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    runs: dict[str, float] = timings.setdefault("runs", {})
    inputs: dict[str, str] = timings.setdefault("inputs", {})
    key = unit_inputs(opts)
    # reused: every output there, last computed with these options (the steps' own lines say what they recompute);
    # a folder of an earlier crate-lm has no record of them
    reused = {u.name: not opts.overwrite and inputs.get(u.name, key) == key
              and all(p.is_file() for p in _outputs(opts, u)) for u in units}
    jobs = min(opts.jobs or default_jobs(), len(units))
    clock = Clock(units, jobs)
    start = time.perf_counter()
    computed = False
    for unit, seconds, was_reused in _run_units(opts, units, data_dir, t0, jobs, reused):
        if not was_reused or unit.name not in runs:
            runs[unit.name] = round(seconds, 1)
        inputs[unit.name] = key
        computed = computed or not was_reused
        log(f"{unit.name}: {'reused' if was_reused else f'done in {seconds:.0f}s'}; "
            f"{clock.done(unit, seconds, was_reused)}", t0)
        timings_path.write_text(json.dumps(timings, indent=1))
    if computed:
        timings["wall"] = round(timings.get("wall", 0.0) + time.perf_counter() - start, 1)
        timings.setdefault("jobs", [])
        if jobs not in timings["jobs"]:
            timings["jobs"].append(jobs)
        timings_path.write_text(json.dumps(timings, indent=1))

    from crate.eval.report.study import write_study_report

    log("report: seed-aware intervals, verdicts, plots", t0)
    index = write_study_report(out, opts, units, timings, command=command)
    log(f"done in {time.perf_counter() - t0:.0f}s (the study took {timings.get('wall', 0) / 60:.1f} min of wall time "
        f"to compute, across resumes)", t0)
    print(f"report: {index.resolve()}")
    return index


__all__ = ["StudyOptions", "study", "build_units", "preflight", "STUDY_SIZES"]
