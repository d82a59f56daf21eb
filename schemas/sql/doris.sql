-- dicomflow Apache Doris schema: the analytics/log store, loaded by Stream Load.
-- Every column name of the seeds' DDL is kept, so the seeds' Routine Load statements
-- (schemas/sql/doris_routine_load.sql) still apply.
--
-- Fixes to the seeds' Doris DDL:
--   1. dicom_state_meta lacked `series_related_instances`, which its own Routine Load
--      writes: added (INT NULL).
--   2. The UNIQUE KEYs of dicom_state_meta and dicom_image_meta included patient_id, so a
--      corrected PatientID produced a second row for the same series/instance. The keys
--      are now the identity the PostgreSQL index uses: (tenant_id, study_uid, series_uid)
--      and (tenant_id, study_uid, series_uid, sop_uid). Doris requires key columns first,
--      so those columns moved to the front; names and types are unchanged.
--   3. dicom_state_meta has a sequence column, `version` (a per-series version kept with
--      the instance facts in PostgreSQL, one more at every flush): a replayed or
--      out-of-order older state can never overwrite a newer one (the PostgreSQL upsert
--      has the same rule). Not updated_time: a wall clock that DST and clock skew between
--      workers can turn back. updated_time stays NOT NULL, in UTC, informational.
--   4. dicom_image_meta.study_date_origin was DATE while it carries the original
--      `YYYYMMDD` string everywhere else: now VARCHAR(8), like dicom_state_meta.
--   5. dicom_object_meta.source_ip was VARCHAR(24), too short for an IPv6 address:
--      now VARCHAR(64).
--   6. Analyst-ready log tables: dicom_object_meta is partitioned by day on
--      created_time (AUTO PARTITION, so created_time is NOT NULL), keyed for time-range
--      scans, and has bloom filters on the UID and trace columns plus inverted indexes
--      on transfer_status and source_ae. dicom_image_meta has bloom filters on its UIDs.
--   7. `DROP TABLE` statements removed: applying the schema must not delete data.
--   8. created_time/updated_time are DATETIME(6): the pipeline's timestamps carry
--      microseconds, and the seeds' DATETIME (scale 0) dropped them.
--   9. dicom_image_meta also uses updated_time as its sequence column (NOT NULL), so an
--      out-of-order replay of an instance never rolls its row back.

CREATE TABLE IF NOT EXISTS dicom_object_meta
(
    created_time        DATETIME(6)   NOT NULL COMMENT 'When the transfer was received/logged',
    tenant_id           VARCHAR(64)   NOT NULL COMMENT 'Tenant ID',
    patient_id          VARCHAR(64)   NOT NULL COMMENT 'Patient ID (empty when the file could not be read)',
    study_uid           VARCHAR(64)   NULL,
    series_uid          VARCHAR(64)   NULL,
    sop_uid             VARCHAR(64)   NULL,
    file_size           BIGINT        NULL,
    file_path           VARCHAR(512)  NULL,
    transfer_syntax_uid VARCHAR(64)   NULL,
    number_of_frames    INT           NULL,
    series_uid_hash     VARCHAR(20)   NULL,
    study_uid_hash      VARCHAR(20)   NULL,
    accession_number    VARCHAR(64)   NULL,
    target_ts           VARCHAR(64)   NULL,
    study_date          DATE          NULL,
    transfer_status     VARCHAR(64)   NULL COMMENT 'SUCCESS, or the error code of a dead-lettered event',
    source_ip           VARCHAR(64)   NULL,
    source_ae           VARCHAR(64)   NULL,
    trace_id            VARCHAR(36)   NOT NULL COMMENT 'Globally unique trace ID, one row per transfer',
    worker_node_id      VARCHAR(64)   NOT NULL COMMENT 'Worker node ID',
    INDEX idx_transfer_status (transfer_status) USING INVERTED,
    INDEX idx_source_ae (source_ae) USING INVERTED
)
ENGINE=OLAP
DUPLICATE KEY(created_time, tenant_id)
AUTO PARTITION BY RANGE (date_trunc(created_time, 'day')) ()
DISTRIBUTED BY HASH(tenant_id) BUCKETS AUTO
PROPERTIES (
    "replication_num" = "1",
    "bloom_filter_columns" = "study_uid,series_uid,sop_uid,trace_id,patient_id",
    "compression" = "zstd"
);

CREATE TABLE IF NOT EXISTS dicom_state_meta
(
    tenant_id                VARCHAR(64)  NOT NULL,
    study_uid                VARCHAR(64)  NOT NULL,
    series_uid               VARCHAR(64)  NOT NULL,
    patient_id               VARCHAR(64)  NOT NULL,
    study_uid_hash           VARCHAR(20)  NOT NULL,
    series_uid_hash          VARCHAR(20)  NOT NULL,
    study_date_origin        VARCHAR(8)   NOT NULL,
    patient_name             VARCHAR(64)  NULL,
    patient_sex              VARCHAR(1)   NULL,
    patient_birth_date       DATE         NULL,
    patient_birth_time       VARCHAR(16)  NULL,
    patient_age              VARCHAR(16)  NULL,
    patient_size             DOUBLE       NULL,
    patient_weight           DOUBLE       NULL,
    pregnancy_status         INT          NULL,
    study_date               DATE         NOT NULL,
    study_time               VARCHAR(16)  NULL,
    accession_number         VARCHAR(16)  NOT NULL,
    study_id                 VARCHAR(16)  NULL,
    study_description        VARCHAR(64)  NULL,
    modality                 VARCHAR(16)  NULL,
    series_number            INT          NULL,
    series_date              DATE         NULL,
    series_time              VARCHAR(16)  NULL,
    series_description       VARCHAR(256) NULL,
    body_part_examined       VARCHAR(64)  NULL,
    protocol_name            VARCHAR(64)  NULL,
    series_related_instances INT          NULL,
    created_time             DATETIME(6)  NULL,
    updated_time             DATETIME(6)  NOT NULL,
    version                  BIGINT       NOT NULL DEFAULT "0"
)
ENGINE=OLAP
UNIQUE KEY(tenant_id, study_uid, series_uid)
DISTRIBUTED BY HASH(tenant_id) BUCKETS AUTO
PROPERTIES (
    "replication_num" = "1",
    "enable_unique_key_merge_on_write" = "true",
    "function_column.sequence_col" = "version",
    "bloom_filter_columns" = "patient_id,accession_number"
);

CREATE TABLE IF NOT EXISTS dicom_image_meta
(
    tenant_id                  VARCHAR(64)  NOT NULL COMMENT "Tenant ID",
    study_uid                  VARCHAR(64)  NOT NULL COMMENT "Study UID",
    series_uid                 VARCHAR(64)  NOT NULL COMMENT "Series UID",
    sop_uid                    VARCHAR(64)  NOT NULL COMMENT "Instance UID",
    patient_id                 VARCHAR(64)  NOT NULL COMMENT "Patient ID",
    study_uid_hash             VARCHAR(20)  NOT NULL COMMENT "Study UID hash value",
    series_uid_hash            VARCHAR(20)  NOT NULL COMMENT "Series UID hash value",
    study_date_origin          VARCHAR(8)   NOT NULL COMMENT "Study date (original YYYYMMDD)",
    content_date               DATE         NULL COMMENT "Content date",
    content_time               VARCHAR(32)  NULL COMMENT "Content time",
    instance_number            INT          NULL COMMENT "Instance number",
    image_type                 VARCHAR(128) NULL COMMENT "Image type",
    image_orientation_patient  VARCHAR(128) NULL COMMENT "Image orientation (patient coordinate system)",
    image_position_patient     VARCHAR(64)  NULL COMMENT "Image position (patient coordinate system)",
    slice_thickness            DOUBLE       NULL COMMENT "Slice thickness",
    spacing_between_slices     DOUBLE       NULL COMMENT "Spacing between slices",
    slice_location             DOUBLE       NULL COMMENT "Slice location",
    samples_per_pixel          INT          NULL COMMENT "Samples per pixel",
    photometric_interpretation VARCHAR(32)  NULL COMMENT "Photometric interpretation",
    width                      INT          NULL COMMENT "Image rows",
    `columns`                  INT          NULL COMMENT "Image columns",
    bits_allocated             INT          NULL COMMENT "Bits allocated",
    bits_stored                INT          NULL COMMENT "Bits stored",
    high_bit                   INT          NULL COMMENT "High bit",
    pixel_representation       INT          NULL COMMENT "Pixel representation",
    rescale_intercept          DOUBLE       NULL COMMENT "Rescale intercept",
    rescale_slope              DOUBLE       NULL COMMENT "Rescale slope",
    rescale_type               VARCHAR(64)  NULL COMMENT "Rescale type",
    window_center              VARCHAR(64)  NULL COMMENT "Window center",
    window_width               VARCHAR(64)  NULL COMMENT "Window width",
    transfer_syntax_uid        VARCHAR(64)  NOT NULL COMMENT "Transfer syntax UID",
    pixel_data_location        VARCHAR(512) NULL COMMENT "Pixel data location",
    thumbnail_location         VARCHAR(512) NULL COMMENT "Thumbnail location",
    sop_class_uid              VARCHAR(64)  NOT NULL COMMENT "SOP class UID",
    image_status               VARCHAR(32)  NULL COMMENT "Image status",
    space_size                 BIGINT       NULL COMMENT "Occupied space size",
    created_time               DATETIME(6)  NULL COMMENT "Creation time",
    updated_time               DATETIME(6)  NOT NULL COMMENT "Update time (sequence column)"
)
ENGINE=OLAP
UNIQUE KEY(tenant_id, study_uid, series_uid, sop_uid)
DISTRIBUTED BY HASH(tenant_id) BUCKETS AUTO
PROPERTIES (
    "replication_num" = "1",
    "enable_unique_key_merge_on_write" = "true",
    "function_column.sequence_col" = "updated_time",
    "bloom_filter_columns" = "sop_uid,patient_id,series_uid_hash"
);
