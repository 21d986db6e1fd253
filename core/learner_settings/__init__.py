"""The learning loop's settings, one module per component, composed by `core.settings`.

They are plain data in the floor layer so that `core.settings` can compose them without
importing the learner; each learner stage reads only its own component
(`settings.learner.gate`, `settings.learner.train`, ...).
"""
