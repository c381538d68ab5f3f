//! The Postgres host of wal_listener: GUCs, shared-memory status, the
//! background worker and the SQL functions. Everything else lives in the
//! pgrx-free `wal_listener_core` crate.

use pgrx::prelude::*;

mod backfill_api;
mod create_extension;
mod gucs;
mod publish_api;
mod shmem;
mod sql_api;
mod user_switch;
mod worker;

::pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    // The worker and its status need shared memory, which exists only when
    // the library is preloaded; loaded later (CREATE EXTENSION alone), the
    // SQL functions still work and report that the worker is not running.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        worker::register();
        create_extension::install();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'wal_listener'", "wal_level = logical"]
    }
}
