-- dicomflow MySQL 8 / MariaDB 10.11 schema: the series index (DICOMFLOW_INDEX_DSN=mysql://...).
-- Applied at every start (under GET_LOCK, so concurrent workers take turns); every statement
-- is idempotent. The same tables as schemas/sql/postgres.sql, column for column.
--
-- Departures from the seeds' MySQL DDL (momostarsky/dicom-server-rs Script/MySQL.sql), each a defect there:
--   1. study_uid_hash / series_uid_hash are varchar(20), not BIGINT: the hashes are the
--      unsigned 64-bit SeaHash written as 20 digits; half of them exceed a signed BIGINT,
--      and the seeds' own PostgreSQL and Doris tables hold them as varchar(20).
--   2. The unique index (tenant_id, study_uid, accession_number) ("one accession number per
--      study") is dropped: every series of a study carries the study's accession number, so
--      it refused the second series of every study.
--   3. Timestamps are DATETIME(6), not TIMESTAMP(6): TIMESTAMP is converted through the
--      session time zone and ends in 2038. created_time/updated_time are NOT NULL with
--      defaults (the get_json_metaes query compares updated_time; a NULL hid a series).
--   4. CREATE TABLE IF NOT EXISTS everywhere (the seeds' plain CREATE TABLE failed on the
--      second start), InnoDB and utf8mb4 stated explicitly (the server default may be latin1
--      or MyISAM), and utf8mb4_bin: keys compare byte for byte, as in PostgreSQL
--      ("T1" and "t1" are two tenants, not one).
--   5. dicom_json_meta, which the seeds' MySQL script lacked although their MySQL provider
--      reads and writes it, with its primary key inside CREATE TABLE.
--   6. An index on dicom_state_meta(updated_time) serves get_json_metaes.
--
-- Added by dicomflow, as in PostgreSQL: dicom_state_meta.version (the per-series version that
-- orders states), dicom_series_version and dicom_series_instance (the per-instance facts that
-- keep series_related_instances exact), so a MySQL index needs no PostgreSQL at all.
--
-- Kept portable on purpose: no ADD COLUMN IF NOT EXISTS / CREATE INDEX IF NOT EXISTS (MariaDB
-- only), indexes inside CREATE TABLE. Statements are separated by a semicolon at a line end.

CREATE TABLE IF NOT EXISTS dicom_state_meta
(
    tenant_id                varchar(64)  not null,
    patient_id               varchar(64)  not null,
    study_uid                varchar(64)  not null,
    series_uid               varchar(64)  not null,
    study_uid_hash           varchar(20)  not null,
    series_uid_hash          varchar(20)  not null,
    patient_name             varchar(64),
    patient_sex              varchar(1),
    patient_birth_date       date,
    patient_birth_time       time(6),
    patient_age              varchar(16),
    patient_size             double,
    patient_weight           double,
    pregnancy_status         integer,
    study_date               date         not null,
    study_date_origin        varchar(8)   not null,
    study_time               time(6),
    accession_number         varchar(16)  not null,
    study_id                 varchar(16),
    study_description        varchar(64),
    modality                 varchar(16),
    series_number            integer,
    series_date              date,
    series_time              time(6),
    series_description       varchar(256),
    body_part_examined       varchar(64),
    protocol_name            varchar(64),
    series_related_instances integer,
    created_time             datetime(6)  not null default current_timestamp(6),
    updated_time             datetime(6)  not null default current_timestamp(6),
    version                  bigint       not null default 0,
    primary key (tenant_id, study_uid, series_uid),
    key dicom_state_meta_updated_time (updated_time)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS dicom_series_version
(
    tenant_id                varchar(64)  not null,
    study_uid                varchar(64)  not null,
    series_uid               varchar(64)  not null,
    version                  bigint       not null,
    created_time             datetime(6),
    primary key (tenant_id, study_uid, series_uid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS dicom_series_instance
(
    tenant_id                varchar(64)  not null,
    study_uid                varchar(64)  not null,
    series_uid               varchar(64)  not null,
    sop_uid                  varchar(64)  not null,
    -- storage-root relative; added to an older table by sinks/mysql_facts.py (no portable IF NOT EXISTS)
    file_path                text         null,
    primary key (tenant_id, study_uid, series_uid, sop_uid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS dicom_json_meta
(
    tenant_id                varchar(64)  not null,
    study_uid                varchar(64)  not null,
    series_uid               varchar(64)  not null,
    study_uid_hash           varchar(20)  not null,
    series_uid_hash          varchar(20)  not null,
    study_date_origin        varchar(8)   not null,
    flag_time                datetime(6)  not null,
    created_time             datetime(6)  not null default current_timestamp(6),
    json_status              int          not null default 0,
    retry_times              int          not null default 0,
    primary key (tenant_id, study_uid, series_uid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
