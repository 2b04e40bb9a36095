//! The store's tests through its public API, in one binary: the engines' behaviour on
//! real databases is tested by the server's `api` and `api_postgres` targets.

mod ids;
mod sqlite;
