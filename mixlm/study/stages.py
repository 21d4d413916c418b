"""The study's stages in order, walked once to run them (`mixlm study run`) or to list them (`status`, `--dry-run`).

    data ─ [score, select … ─ prepared] ─ sample-r0 ─ sweep-<scale>-r0 (each scale) ─ fit-r0 ─ propose-r0
         ─ refinement rounds r = 1..R: sample-rR (around the last proposal) ─ sweep-<search scale>-rR ─ fit-rR
           ─ propose-rR; stop when the proposal moved less than refine.stop_below
         ─ candidates (proposed, natural, uniform, baselines) ─ candidates-<scale> (each proxy scale)
         ─ validate-<candidate>-seed<s> (the target config, each seed) ─ export-<candidate> ─ eval-<candidate>
         ─ report

The builders of each part: mixlm.study.data (data and selection knobs), mixlm.study.search (sample, sweep, fit,
propose, rounds), mixlm.study.validation (candidates to eval) and mixlm.study.report; each meets its stages
through mixlm.study.pipeline.Study.
"""

from __future__ import annotations

from mixlm import storage
from mixlm.study import data, report, search, validation
from mixlm.study.graph import StageError
from mixlm.study.pipeline import Study


def walk(study: Study) -> Study:
    """Meets every stage of the study in order (running them in run mode); returns `study`."""
    if study.mode == "run":
        study.root.mkdir(parents=True, exist_ok=True)
        storage.write_json(study.root / "study.json", {"source": study.spec.source, "spec": study.spec.to_dict()})
    prepared = data.data_stages(study)
    proposal = search.search_stages(study, prepared)
    if study.spec.validation is not None:
        validation.validation_stages(study, prepared, proposal)
    report.report_stage(study)
    if study.only and study.only not in {s.name for s in study.planned}:
        raise StageError(f"--stage {study.only}: no such stage in this study; `mixlm study status "
                         f"{study.spec.source}` lists them", 2)
    return study
