"""Several models interpreted on the same tokens (e.g. CRATE and GPT, with random-init controls), each into
<out>/<name>/ (the layout of crate.eval.autointerp.interpret), and their paired comparison:

<out>/summary.json is {"models": {<name>: {"layers", "aggregate", "protocol"}}, "comparison": {"<a> - <b>":
{"difference", "ci95", "paired", "relative", "layers_a", "layers_b", "exclude_last", "flags": [{"flag", "reason"}]
(crate.eval.validity.flags), "density_reweighted" (validated models: the difference at one activation-density mix,
crate.eval.validity.estimands.density_reweighted)}}, "controls": {<name>: {"aggregate", "layers"}}, "provenance":
{<name>: ...}}; <out>/provenance.json and <out>/summary.md beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crate.errors import CrateError
from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.interpret import Validate, execute_plan, plan_interpret
from crate.eval.autointerp.summary import summary_markdown, write_json
from crate.eval.stats.neurons import compare_models
from crate.eval.validity.estimands import density_mix, density_reweighted
from crate.eval.validity.flags import comparison_flags
from crate.provenance import canonical, check_owned, claim


def run_compare(checkpoints: dict[str, str | Path], data_dir: str | Path, out_dir: str | Path,
                config: InterpretConfig | None = None, controls: bool = False,
                overwrite: bool = False, validate: Validate | None = None) -> dict[str, Any]:
    """Interpret several models (e.g. {"crate": ..., "gpt": ...}) into <out>/<name>/, optionally with
    random-init controls (<out>/<name>-control/), and write the paired comparison to <out>/summary.json.
    Every model is planned (and so checked) before the first one is recorded; all must read the same tokens.
    `validate` (crate.eval.validity.run.validate) checks the scorer on every trained model (not the controls), and
    each comparison of two validated models gets the flags of crate.eval.validity.flags."""
    cfg = config or InterpretConfig()
    out = Path(out_dir)
    runs = {name: (ckpt, cfg) for name, ckpt in checkpoints.items()}
    if controls:
        runs.update({f"{name}-control": (ckpt, InterpretConfig(**{**cfg.to_dict(), "control": True}))
                     for name, ckpt in checkpoints.items()})
    check_owned(out)
    plans = {name: plan_interpret(ckpt, data_dir, out / name, c, overwrite=overwrite, name=name, say_tokens=i == 0)
             for i, (name, (ckpt, c)) in enumerate(runs.items())}  # the same tokens for all: said once
    tokens = {name: p.provenance["data"]["tokens_sha256"] for name, p in plans.items()}
    if len(set(tokens.values())) > 1:
        raise CrateError(f"the models would be recorded on different tokens ({tokens}): a paired comparison needs "
                         f"one data directory and one --tokens / --seq-len for all")
    claim(out)  # before its models' folders: the comparison's own files go beside them
    results = {name: execute_plan(plan, None if name.endswith("-control") else validate) for name, plan in plans.items()}
    comparison = {}
    names = [n for n in results if not n.endswith("-control")] + [n for n in results if n.endswith("-control")]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = results[a], results[b]
            scores = lambda s: {k: {int(n): v for n, v in d.items()} for k, d in s["scores"].items() if k.isdigit()}  # noqa: E731
            comparison[f"{a} - {b}"] = compare_models(
                scores(sa), scores(sb), sa["aggregate"]["n_layer"], sb["aggregate"]["n_layer"], cfg.exclude_last,
                n_boot=cfg.n_boot, seed=cfg.seed)
            comparison[f"{a} - {b}"]["flags"] = comparison_flags(
                sa.get("validity"), sb.get("validity"), comparison[f"{a} - {b}"]["difference"], (a, b))
            if sa.get("validity") and sb.get("validity"):
                c = comparison[f"{a} - {b}"]
                c["density_reweighted"] = density_reweighted(
                    density_mix(sa["validity"]["layers"], sa["scores"], c["layers_a"]),
                    density_mix(sb["validity"]["layers"], sb["scores"], c["layers_b"]), n_boot=cfg.n_boot,
                    seed=cfg.seed)
    summary = {"models": {k: {kk: v[kk] for kk in ("layers", "aggregate", "protocol")} for k, v in results.items()},
               "comparison": comparison, "provenance": {k: v["provenance"] for k, v in results.items()},
               "controls": {k[: -len("-control")]: {"aggregate": v["aggregate"], "layers": v["layers"]}
                            for k, v in results.items() if k.endswith("-control")}}
    write_json(out / "summary.json", summary)
    write_json(out / "provenance.json", summary["provenance"])
    (out / "summary.md").write_text(summary_markdown(summary["models"], comparison))
    return canonical(summary)


__all__ = ["run_compare"]
