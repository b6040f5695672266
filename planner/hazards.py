"""Built-in knowledge, used with or without a loaded catalog: what Postgres's built-in functions
do that a cached result cannot follow (the clock, the session or the server's state, side
effects, reaching outside the database), and which pg_catalog relations change without DDL.
Judged by name alone, whatever pg_proc says about volatility; planner.rules applies it.
"""

from __future__ import annotations

# The answer moves with the clock (most are STABLE in pg_proc: constant within a transaction,
# not across statements). age(x) with one argument is age(current_date, x); see rules.Rules.function.
TIME_DEPENDENT = frozenset({
    "now", "statement_timestamp", "transaction_timestamp", "clock_timestamp", "timeofday",
    "current_timestamp", "current_date", "current_time", "localtime", "localtimestamp",
    "pg_timezone_names", "pg_timezone_abbrevs", "pg_timezone_abbrevs_zone", "pg_timezone_abbrevs_abbrevs",
    "pg_stat_get_snapshot_timestamp",
})
# The answer depends on the connection, the server's state or settings that are not part of
# the plan-cache key (database, user, search_path): never cacheable.
SESSION_DEPENDENT = frozenset({
    "current_setting", "current_query", "pg_backend_pid", "inet_client_addr", "inet_client_port",
    "inet_server_addr", "inet_server_port", "pg_conf_load_time", "pg_postmaster_start_time",
    "txid_current", "txid_current_if_assigned", "txid_current_snapshot", "txid_status",
    "pg_current_xact_id", "pg_current_xact_id_if_assigned", "pg_current_snapshot", "pg_xact_status",
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn", "pg_is_in_recovery",
    "pg_last_wal_receive_lsn", "pg_last_wal_replay_lsn", "pg_last_xact_replay_timestamp",
    "pg_my_temp_schema", "pg_is_other_temp_schema", "pg_trigger_depth", "pg_listening_channels",
    "pg_notification_queue_usage", "pg_cursor", "pg_prepared_statement", "pg_show_all_settings",
    "pg_current_logfile", "pg_blocking_pids", "pg_safe_snapshot_blocking_pids", "pg_jit_available",
    "pg_get_replication_slots", "pg_available_extensions", "pg_available_extension_versions",
    "pg_extension_update_paths", "pg_config", "pg_relation_filenode", "pg_relation_filepath",
    "pg_relation_size", "pg_total_relation_size", "pg_table_size", "pg_indexes_size",
    "pg_database_size", "pg_tablespace_size", "mxid_age", "pg_control_checkpoint",
    "pg_control_system", "pg_control_init", "pg_control_recovery", "system_user",
    "get_current_ts_config", "pg_get_backend_memory_contexts", "pg_get_shmem_allocations",
    "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir",
})
SESSION_DEPENDENT_PREFIXES = ("pg_stat_get_", "pg_stat_file", "pg_walfile_name", "pg_wal_lsn")
# Effects beyond the result: sequences, sleeping, locks, notifications, settings, files,
# other servers, other backends. Never cacheable; flagged SIDE_EFFECT_FUNCTION.
SIDE_EFFECTS = frozenset({
    "nextval", "setval", "currval", "lastval", "setseed", "random", "random_normal",
    "gen_random_uuid", "uuidv4", "uuidv7", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    "pg_notify", "set_config", "pg_advisory_unlock_all", "pg_terminate_backend", "pg_cancel_backend",
    "pg_reload_conf", "pg_rotate_logfile", "pg_promote", "pg_switch_wal", "pg_create_restore_point",
    "pg_logical_emit_message", "pg_create_logical_replication_slot", "pg_create_physical_replication_slot",
    "pg_drop_replication_slot", "pg_copy_logical_replication_slot", "pg_copy_physical_replication_slot",
    "pg_replication_slot_advance", "pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes",
    "pg_backup_start", "pg_backup_stop", "pg_file_write", "pg_file_rename", "pg_file_unlink",
    "pg_import_system_collations", "pg_log_backend_memory_contexts", "txid_current",
    "pg_current_xact_id", "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_clear_attribute_stats",
    "pg_restore_attribute_stats", "pg_clear_relation_stats", "pg_restore_relation_stats",
})
SIDE_EFFECT_PREFIXES = ("pg_advisory_", "pg_try_advisory_", "lo_", "dblink", "pg_sleep", "pg_stat_reset",
                        "pg_replication_origin_", "pg_create_", "pg_drop_")
# Reach outside the database (server files, other servers, other sessions): flagged
# DANGEROUS_FUNCTION for guardrails.
DANGEROUS = frozenset({
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir",
    "pg_ls_replslotdir", "pg_file_write", "pg_file_rename", "pg_file_unlink", "lo_import", "lo_export",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_switch_wal", "pg_create_restore_point", "pg_backup_start", "pg_backup_stop",
    "pg_drop_replication_slot", "pg_create_logical_replication_slot", "pg_create_physical_replication_slot",
    "pg_logical_emit_message", "pg_log_backend_memory_contexts",
})
DANGEROUS_PREFIXES = ("dblink", "pg_stat_reset")

# pg_catalog relations whose rows change without DDL (statistics, activity, settings, locks,
# sequence values, large objects, files on the server) or depend on the session: never
# cacheable. pg_class and pg_database are cacheable except for their statistics columns
# (see rules.column_reason).
LIVE_CATALOG_PREFIXES = ("pg_stat_", "pg_statio_", "pg_stats", "pg_shmem_allocations", "pg_timezone_",
                         "pg_available_extension", "pg_replication_", "pg_prepared_", "pg_largeobject")
LIVE_CATALOG_NAMES = frozenset({
    "pg_aios", "pg_backend_memory_contexts", "pg_config", "pg_cursors", "pg_file_settings",
    "pg_hba_file_rules", "pg_ident_file_mappings", "pg_locks", "pg_sequences", "pg_settings",
    "pg_statistic", "pg_statistic_ext_data", "pg_subscription_rel", "pg_wait_events",
})


def live_catalog(name: str) -> bool:
    """Is pg_catalog.`name` a relation whose rows change without DDL?"""
    return name in LIVE_CATALOG_NAMES or name.startswith(LIVE_CATALOG_PREFIXES)


SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


def builtin_hazard(name: str) -> tuple[bool, bool, bool, bool]:
    """(time-dependent, session-dependent, side effects, dangerous) for a built-in function
    name (lower case), whatever pg_proc says about its volatility. Dangerous functions reach
    outside the database (files, other servers, other backends) and count as side effects too."""
    danger = name in DANGEROUS or name.startswith(DANGEROUS_PREFIXES)
    return (name in TIME_DEPENDENT,
            name in SESSION_DEPENDENT or name.startswith(SESSION_DEPENDENT_PREFIXES),
            danger or name in SIDE_EFFECTS or name.startswith(SIDE_EFFECT_PREFIXES),
            danger)
