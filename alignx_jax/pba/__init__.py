"""PBA (preference-based alignment) orchestration: what joins the preference head (`models.preference_head`)
to data rows and to training runs.

  * `pba.predict`: persona-only prompts, features, P~ predictions, the release's rule, `alignx predict-preferences`
  * `pba.head_training`: two-stage head training on a frozen backbone
  * `pba.stages`: the head steps of `alignx train` (joint head, two-stage fit, first-stage predicted P~)
"""
