"""The pipeline: the Pass API and registry, the pass manager, verification and the report."""
