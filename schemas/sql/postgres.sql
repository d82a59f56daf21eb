-- dicomflow PostgreSQL schema: the series index.
-- Applied at every start; every statement is idempotent.
--
-- Ported from the seeds' PostgreSQL DDL. Fixes, each a defect in the original:
--   1. `drop table if exists dicom_json_meta` removed: applying the schema at start-up
--      must never destroy the JSON-generation bookkeeping. All tables use IF NOT EXISTS.
--   2. The unique index `index_state_unique (tenant_id, study_uid, series_uid,
--      accession_number)` is dropped: it is a superset of the primary key, so it can
--      never reject anything and only doubles the write cost of every upsert.
--   3. dicom_json_meta gets its primary key inside CREATE TABLE (the original's separate
--      ALTER TABLE ... ADD CONSTRAINT fails on a second run).
--   4. `created_time`/`updated_time` of dicom_state_meta are NOT NULL with defaults:
--      the seeds' get_json_metaes query compares updated_time, and a NULL there would
--      hide a series from JSON generation forever.
--   5. An index on dicom_state_meta(updated_time) serves get_json_metaes
--      (`updated_time < $1 ... order by updated_time`).
--
-- Added by dicomflow (not in the seeds):
--   6. dicom_series_instance: one row per SOP instance ever stored for a series. The series
--      stage inserts a window's instances and reads the count back in one transaction, so
--      `series_related_instances` is exact forever: across restarts, a broker that lost
--      everything, pruned window state, and instances sent again.
--   7. dicom_state_meta.version: a per-series version (dicom_series_version), one more at
--      every flush; it orders states (newest wins), not updated_time, a wall clock that DST
--      and clock skew between workers can turn back. updated_time is UTC, informational.

CREATE TABLE IF NOT EXISTS dicom_state_meta
(
    tenant_id                varchar(64) not null,
    patient_id               varchar(64) not null,
    study_uid                varchar(64) not null,
    series_uid               varchar(64) not null,
    study_uid_hash           varchar(20) not null,
    series_uid_hash          varchar(20) not null,
    patient_name             varchar(64),
    patient_sex              varchar(1),
    patient_birth_date       date,
    patient_birth_time       time,
    patient_age              varchar(16),
    patient_size             double precision,
    patient_weight           double precision,
    pregnancy_status         integer,
    study_date               date        not null,
    study_date_origin        varchar(8)  not null,
    study_time               time,
    accession_number         varchar(16) not null,
    study_id                 varchar(16),
    study_description        varchar(64),
    modality                 varchar(16),
    series_number            integer,
    series_date              date,
    series_time              time,
    series_description       varchar(256),
    body_part_examined       varchar(64),
    protocol_name            varchar(64),
    series_related_instances integer,
    created_time             timestamp   not null default current_timestamp(6),
    updated_time             timestamp   not null default current_timestamp(6),
    version                  bigint      not null default 0,
    primary key (tenant_id, study_uid, series_uid)
);

CREATE INDEX IF NOT EXISTS dicom_state_meta_updated_time ON dicom_state_meta (updated_time);

-- Databases created before the version column existed.
ALTER TABLE dicom_state_meta ADD COLUMN IF NOT EXISTS version bigint not null default 0;

CREATE TABLE IF NOT EXISTS dicom_series_version
(
    tenant_id                varchar(64) not null,
    study_uid                varchar(64) not null,
    series_uid               varchar(64) not null,
    version                  bigint      not null,
    created_time             timestamp,
    primary key (tenant_id, study_uid, series_uid)
);

ALTER TABLE dicom_series_version ADD COLUMN IF NOT EXISTS created_time timestamp;

CREATE TABLE IF NOT EXISTS dicom_series_instance
(
    tenant_id                varchar(64) not null,
    study_uid                varchar(64) not null,
    series_uid               varchar(64) not null,
    sop_uid                  varchar(64) not null,
    file_path                text,
    primary key (tenant_id, study_uid, series_uid, sop_uid)
);

-- Where the instance's file is (storage-root relative, as in the storage event): the series
-- JSON reads the files from here, whatever layout they were stored or backfilled in. NULL for
-- rows recorded before this column (the SCP's layout is looked at instead).
ALTER TABLE dicom_series_instance ADD COLUMN IF NOT EXISTS file_path text;

CREATE TABLE IF NOT EXISTS dicom_json_meta
(
    tenant_id                varchar(64) not null,
    study_uid                varchar(64) not null,
    series_uid               varchar(64) not null,
    study_uid_hash           varchar(20) not null,
    series_uid_hash          varchar(20) not null,
    study_date_origin        varchar(8)  not null,
    flag_time                timestamp   not null,
    created_time             timestamp   not null default current_timestamp(6),
    json_status              int         not null default 0,
    retry_times              int         not null default 0,
    CONSTRAINT pk_dicom_json_meta PRIMARY KEY (tenant_id, study_uid, series_uid)
);
