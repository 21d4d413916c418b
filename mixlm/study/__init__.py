"""`mixlm study`: a data-mixture study from one YAML, composed of mixlm's verbs.

    spec = load_study("configs/studies/demo.yaml")        # mixlm.study.spec: the schema, checked up front
    walk(Study(spec))                                     # mixlm.study.stages: every stage not done yet

Modules, one job each: spec (the study file), graph (stages keyed by their inputs, stage.json records, locks),
verbs (the verbs a stage runs, in this process), runner (proxy sweeps and their runs' result.json), pipeline (a
walk's Study and the status), stages (the stages in order), data (prepared data, the demo corpus, selection
knobs), search (sample, sweep, fit, propose, refinement rounds), validation (candidates at the target scale,
export, eval), transfer (rank correlation and decision accuracy with bootstrap intervals), cost (device-hours,
`--dry-run`), facts / report / report_plots / document (the report as Markdown and HTML).
"""

from mixlm.study.pipeline import Study
from mixlm.study.spec import StudySpec, load_study
from mixlm.study.stages import walk

__all__ = ["Study", "StudySpec", "load_study", "walk"]
