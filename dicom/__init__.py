"""Reading DICOM: the header scan, the seeds' extraction rules, value parsers, storage paths.

One reader for every caller (ingest, the SCP, backfill, ``inspect``)."""
