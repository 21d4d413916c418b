"""`mixlm study`: a data-mixture study from one YAML, composed of mixlm's verbs.

    spec = load_study("configs/studies/demo.yaml")        # mixlm.study.spec: the schema, checked up front
    walk(Study(spec))                                     # mixlm.study.pipeline: every stage not done yet

Modules, one job each: spec (the study file), graph (stages keyed by their inputs, stage.json records, locks),
verbs (the verbs a stage runs, in this process), pipeline (the walk and the status), data (prepared data, the
demo corpus, selection knobs), search (sample, sweep, fit, propose, refinement rounds), validation (candidates
at the target scale, export, eval), transfer (rank correlation and decision accuracy with bootstrap intervals),
cost (device-hours, `--dry-run`), facts / report / report_plots / document (the report as Markdown and HTML).
"""

from mixlm.study.pipeline import Study, walk
from mixlm.study.spec import StudySpec, load_study

__all__ = ["Study", "StudySpec", "load_study", "walk"]
