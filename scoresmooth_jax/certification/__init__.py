"""Certification jobs over a dataset and what people read from them: ``certify_job.run_certification(config,
workdir)``, its per-image records (``records``), certified-accuracy tables and curves (``report``) and denoising
figures (``figures``).

Nothing is imported here, so importing one module does not pull in the others.
"""
