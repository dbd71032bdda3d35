"""The built-in synthetic CT cohort: an analytic phantom written as real DICOM and DeepLesion files.

- :mod:`dompre.synth.anatomy`: the reference body as a table of structures (tissue, centre, size, z range)
  and the evaluator that turns one patient's table into the shapes of a slice.
- :mod:`dompre.synth.phantom`: patients (body, pose, scan protocol), lesions, and rendering to an HU volume
  with per-slice body-part labels and lesion boxes.
- :mod:`dompre.synth.terms`: the LesaNet ontology rows of the terms the phantom produces.
- :mod:`dompre.synth.dicom`: CT DICOM series (and scouts) written from an HU volume.
- :mod:`dompre.synth.cohort`: ``generate_cohort``, the cohort folder (DICOM share, DeepLesion share, truth
  tables, ``cohort.json``).

Nothing in :mod:`dompre.data` (the readers and the store) imports this package.
"""
