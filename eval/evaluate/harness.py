"""Downstream evaluation with EleutherAI's lm-evaluation-harness (`crate eval --tasks ...`).

The checkpoint is turned into its transformers class in memory (`CrateForCausalLM` or `GPT2LMHeadModel`, no
export to disk) and handed to the harness's own `HFLM`. We chose HFLM over an `lm_eval` model class of our own:
it already batches, truncates, rolls long documents into windows and generates, for every output type, and
the transformers class gives our logits to float32 rounding, so a second implementation of that logic would
only be a second place for bugs. The results JSON is written by the harness's own `EvaluationTracker`, as
`lm_eval --model hf --model_args pretrained=<checkpoint> --output_path out.json [--log_samples]` writes it (the
`simple_evaluate` output, `task_hashes` and the general config fields), but at exactly `out` instead of
`out_<date>.json`; its per-sample files go beside it under the harness's names.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from crate.errors import CrateError

INSTALL = "pip install 'crate-lm[eval]' (lm-eval==0.4.13)"


class HarnessError(CrateError):
    """lm-evaluation-harness cannot run: not installed, unknown tasks, or no tokenizer for the checkpoint."""


def task_manager(include_path: str | os.PathLike | None = None, builtin: bool = True):  # -> lm_eval.tasks.TaskManager
    """The harness's task index: its own tasks (indexing them takes seconds) unless `builtin=False`, and
    the task YAMLs under `include_path`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HarnessError(f"`crate eval --tasks` needs lm-evaluation-harness: {INSTALL}") from e
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=builtin)


def check_tasks(tasks: list[str], manager: Any) -> None:
    """Refuse unknown task names before any model is loaded, suggesting close ones."""
    import difflib

    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise HarnessError(f"unknown lm-eval tasks {unknown} (close: {hints}); `lm-eval ls tasks` lists them, and "
                           f"--include-path DIR adds task YAMLs of your own")


def run_harness(checkpoint: str | os.PathLike, tasks: list[str], out: str | os.PathLike | None = None, *,
                data: str | os.PathLike | None = None, include_path: str | os.PathLike | None = None,
                batch_size: int = 8, device: str | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, log_samples: bool = False, builtin: bool = True) -> dict[str, Any]:
    """Evaluate `checkpoint` on lm-eval `tasks` through HFLM; write the results JSON to `out` if given."""
    import torch

    import crate
    from crate.hf import hf_tokenizer, to_transformers
    from crate.loading import checkpoint_tokenizer
    from crate.tokenizer import EOT

    manager = task_manager(include_path, builtin)
    check_tasks(tasks, manager)
    tok, _ = checkpoint_tokenizer(checkpoint, data)
    if tok is None:
        raise HarnessError(f"no tokenizer for {checkpoint}: lm-eval scores text, so pass --data DIR (the prepared "
                           f"data directory the model was trained on, which holds tokenizer.json)")
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = crate.load(checkpoint, map_location=device)
    hf = to_transformers(model, tok.token_to_id(EOT))
    lm = HFLM(pretrained=hf, tokenizer=hf_tokenizer(tok, model.config.block_size), batch_size=batch_size,
              max_length=model.config.block_size, device=device)
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count; below 1 the harness reads it as a fraction of each task
    tracker = EvaluationTracker()  # its clock starts here, as in lm_eval's CLI
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=log_samples, evaluation_tracker=tracker)
    # what lm_eval --model hf --model_args pretrained=<checkpoint> records (given a model object it says "CUSTOM")
    tracker.general_config_tracker.log_experiment_args(
        model_source="hf", model_args={"pretrained": str(checkpoint)}, system_instruction=None, chat_template=None,
        fewshot_as_multiturn=False)
    if out is not None:
        write_results(results, out, tracker)
    return results


def write_results(results: dict[str, Any], out: str | os.PathLike, tracker: Any) -> Path:
    """`results` through `tracker`'s own save methods into a temporary folder beside `out`, then moved into place:
    the results JSON to `out`, the per-sample files (when `results` has samples) beside it."""
    import tempfile

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lm_eval-") as tmp:
        tracker.output_path = str(Path(tmp) / path.name)
        tracker.save_results_aggregated(results={k: v for k, v in results.items() if k != "samples"},
                                        samples=samples)
        written = sorted(Path(tmp).glob("*.json"))
        if len(written) != 1:  # the tracker logs its failures instead of raising them
            raise HarnessError(f"lm-eval's EvaluationTracker did not write the results JSON for {out}")
        for task, rows in (samples or {}).items():  # (the tracker rewrites the rows it saves: give it copies)
            tracker.save_results_samples(task_name=task, samples=copy.deepcopy(rows))
        for f in Path(tmp).glob("samples_*.jsonl"):
            os.replace(f, path.parent / f.name)
        os.replace(written[0], path)
    return path


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)
