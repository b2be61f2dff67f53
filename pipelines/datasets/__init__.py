"""Training/evaluation datasets on disk: HCL-AL's layout (NIfTI + CSVs), written and read without a database.

- :mod:`pipelines.datasets.hclal_layout`: the file formats (per-study NIfTI images, HCL-AL's CSVs);
- :mod:`pipelines.datasets.hclal_truth`: ground truth between coded library sites and HCL-AL strings;
- :mod:`pipelines.datasets.rebuild`: a study's CT, SUV and SEG objects rebuilt from its DICOM instances,
  with the same stages as the analysis, so an exported mask is the lesion the analysis measured.
"""
