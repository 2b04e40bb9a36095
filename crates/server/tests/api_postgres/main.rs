//! The `api` integration tests again, on PostgreSQL: the same files, compiled into a target
//! named `api_postgres`, from which `helpers::backend()` picks the engine. Needs
//! `APEX_TEST_POSTGRES_URL`; without it every test fails, naming it, and `scripts/test.sh`
//! leaves this target out (counted as skipped) unless `CI` is set. See
//! `tests/api/helpers.rs`.

#[path = "../api/main.rs"]
mod api;

// The test files reach their helpers as `crate::helpers`.
use api::*;
